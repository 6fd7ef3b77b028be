"""Local files as a source: jsonl, json, parquet, csv and txt, one file or a folder of them.

A txt file gives one document per paragraph (blank-line separated). Problems a user can fix
(bad UTF-8, a malformed JSON line, a missing field, nothing to read) become one-line errors
that name the file and, where there is one, the line.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from doge_cli.errors import DogeError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def find_files(path: Path) -> tuple[str, list[Path]]:
    """The builder name and the data files at ``path`` (a file, or a folder searched recursively)."""
    path = Path(path)
    if not path.exists():
        raise DogeError(f"input {path} does not exist; give a file or folder of jsonl, json, parquet, csv or txt")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
    files = [f for f in files if not f.name.startswith(".")]
    if not files:
        raise DogeError(f"no jsonl, json, parquet, csv or txt files in {path}")
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        raise DogeError(f"{path}: unsupported file type {path.suffix!r}; use jsonl, json, parquet, csv or txt")
    if len(kinds) > 1:
        raise DogeError(f"{path} mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        raise DogeError(f"{empty[0]} is empty; remove it or fill it")
    return kinds.pop(), files


def check_utf8(path: Path) -> None:
    """Raise a DogeError naming the line of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise DogeError(f"{path}:{line}: text is not UTF-8; re-encode the file as UTF-8") from err
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise DogeError(f"{path}:{line}: text is not UTF-8 (truncated character at the end)") from err


def check_json_lines(path: Path) -> None:
    """Every non-blank line of a JSON Lines file must be an object (a row); a bare array or scalar would
    otherwise be read as rows of an invented column."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            first = line.lstrip()[:1]
            if first and first != b"{":
                raise DogeError(f"{path}:{n}: each JSON line must be an object such as {{\"text\": \"...\"}}; "
                                "fix or remove that line")


def _find_bad_json(path: Path) -> DogeError | None:
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            return DogeError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); fix the file")
        return None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                return DogeError(f"{path}:{n}: malformed JSON line ({err.msg}); fix or remove that line")
            if not isinstance(obj, dict):
                return DogeError(f"{path}:{n}: each JSON line must be an object, got {type(obj).__name__}")
    return None


def load_local(path: Path):
    """Read local data files into a ``datasets.Dataset`` (raw columns, not yet normalized)."""
    import datasets

    builder, files = find_files(path)
    if builder != "parquet":
        for f in files:
            check_utf8(f)
            if f.suffix == ".jsonl":
                check_json_lines(f)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    # Its loaders log a parse failure (at ERROR) before raising; doge says it once, in its own line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors; find the line ourselves
        if builder == "json":
            for f in files:
                bad = _find_bad_json(f)
                if bad is not None:
                    raise bad from err
        raise DogeError(f"cannot read {path} as {builder}: {' '.join(str(err).split())[:200]}") from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise DogeError(f"{path} holds no rows")
    return ds
