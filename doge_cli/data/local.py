"""Local files as a source: jsonl, json, parquet, csv and txt, one file or a folder of them, read as a
stream of row batches (memory is a batch, whatever the corpus size).

A txt file gives one document per paragraph (blank-line separated); csv fields are read as text. A
``.json`` file (one JSON array or object) is parsed whole: use jsonl for large corpora. Problems a user
can fix (bad UTF-8, a malformed JSON line, a line that is not an object, nothing to read) become one-line
errors that name the file and, where there is one, the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from doge_cli.errors import DogeError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
BATCH_ROWS = 8192


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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, read a line at a time."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DogeError(f"{path}:{n}: text is not UTF-8; re-encode the file as UTF-8") from None


def _jsonl_rows(path: Path) -> Iterator[dict]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        if line.lstrip()[:1] != "{":
            raise DogeError(f"{path}:{n}: each JSON line must be an object such as {{\"text\": \"...\"}}; "
                            "fix or remove that line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DogeError(f"{path}:{n}: malformed JSON line ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):  # pragma: no cover - a line starting with "{" parses to an object
            raise DogeError(f"{path}:{n}: each JSON line must be an object, got {type(row).__name__}")
        yield row


def _json_rows(path: Path) -> Iterator[dict]:
    text = "\n".join(line for _, line in _lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DogeError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); fix the file") from None
    if isinstance(data, dict):  # {"data": [...]} as datasets' json loader reads, or columns of equal length
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DogeError(f"{path}: expected a JSON array of objects (rows); use jsonl with one object per line")
    yield from data


def _txt_rows(path: Path) -> Iterator[dict]:
    paragraph: list[str] = []
    for _, line in _lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield {"text": "\n".join(paragraph)}


def _columnar_batches(path: Path, builder: str) -> Iterator[dict[str, list]]:
    import pyarrow as pa

    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH_ROWS):
                yield batch.to_pydict()
            return
        import csv

        import pyarrow.csv as pcsv

        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DogeError(f"{path} has no header row; the first line must name the columns")
        reader = pcsv.open_csv(str(path), convert_options=pcsv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=False))
        for batch in reader:
            yield batch.to_pydict()
    except UnicodeDecodeError:
        raise DogeError(f"{path}: text is not UTF-8; re-encode the file as UTF-8") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise DogeError(f"cannot read {path} as {builder}: {' '.join(str(err).split())[:200]}") from None


def iter_local(path: Path, max_rows: int | None = None) -> Iterator[dict[str, list]]:
    """Batches of rows (column -> values, every column seen so far in every batch, None where a row lacks it)
    from the data files at ``path``, at most ``max_rows`` rows in all; raises a DogeError when there are none."""
    builder, files = find_files(path)
    seen: dict[str, None] = {}
    total = 0

    def columns(rows: list[dict]) -> dict[str, list]:
        for row in rows:
            for key in row:
                seen.setdefault(key)
        return {key: [row.get(key) for row in rows] for key in seen}

    for f in files:
        if builder in ("parquet", "csv"):
            for batch in _columnar_batches(f, builder):
                rows = len(next(iter(batch.values()), []))
                if max_rows is not None and total + rows > max_rows:
                    batch = {k: v[:max_rows - total] for k, v in batch.items()}
                    rows = max_rows - total
                for key in batch:
                    seen.setdefault(key)
                total += rows
                yield {key: batch.get(key, [None] * rows) for key in seen}
                if max_rows is not None and total >= max_rows:
                    return
            continue
        reader = _jsonl_rows(f) if f.suffix == ".jsonl" else _json_rows(f) if builder == "json" else _txt_rows(f)
        pending: list[dict] = []
        for row in reader:
            pending.append(row)
            total += 1
            if len(pending) >= BATCH_ROWS or (max_rows is not None and total >= max_rows):
                yield columns(pending)
                pending = []
                if max_rows is not None and total >= max_rows:
                    return
        if pending:
            yield columns(pending)
    if total == 0:
        raise DogeError(f"{path} holds no rows")
