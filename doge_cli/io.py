"""Writes that are complete or absent, and never replace what doge did not create.

- :func:`atomic_dir` builds a folder under a temporary name beside its destination and renames it
  into place; :func:`write_text_atomic` and :func:`write_json` do the same for one file. A crash,
  a failure or a full disk leaves the destination as it was.
- **Only doge's own outputs are replaced.** Every folder written through :func:`atomic_dir` carries
  a marker file (:data:`OUTPUT_MARKER`) that lists the files doge wrote there. An existing destination
  is replaced only when it carries that marker and holds nothing else (a user's notes, an edited model
  card or an eval folder put inside stop it, and the file is named), or is an empty folder; a file, or a
  folder of someone else's files, is refused with a one-line error before any work is done
  (:func:`check_replaceable`). A marker from before the list was kept counts as doge's folder. A file
  is replaced only when the caller's ``is_ours`` check recognises it as one doge wrote.
- Names a user gives for a single folder (``--name``) must be one path component
  (:func:`check_component`), so no name escapes the folder it is meant for.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from doge_cli.errors import DogeError

OUTPUT_MARKER = ".doge-output"
"""File inside every folder doge writes atomically: {"kind", "doge_version", "created"}."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it wraps: datasets and pyarrow wrap OSErrors) is ENOSPC."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def is_doge_output(path: Path) -> bool:
    """True for a folder written by :func:`atomic_dir` (it holds the marker)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path, sorted (the marker excluded)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != OUTPUT_MARKER)


def foreign_files(folder: Path) -> list[str]:
    """The files in a doge output folder that its marker does not list (none for a marker without a list)."""
    marker = read_json_object(Path(folder) / OUTPUT_MARKER)
    written = marker.get("files") if marker else None
    if not isinstance(written, list):
        return []
    return sorted(set(files_in(folder)) - set(written))


def check_replaceable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse a destination doge may not replace: a file, a non-empty folder without the marker, or a doge
    folder that holds files doge did not write there."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise DogeError(f"{what} {path} exists and is not a folder doge wrote; choose another path "
                        "(doge replaces only folders it created)")
    if is_doge_output(path):
        foreign = foreign_files(path)
        if foreign:
            raise DogeError(f"{what} {path} holds {foreign[0]}, which doge did not write there; move it out or choose "
                            "another path (doge replaces only what it created)")
        return
    if not any(path.iterdir()):
        return
    raise DogeError(f"{what} {path} holds files doge did not write; choose another path or empty it yourself "
                    "(doge replaces only folders it created)")


def check_apart(out: str | os.PathLike, inputs: dict[str, Any], what: str = "--out") -> None:
    """Refuse an output that is, holds, or sits inside one of the ``inputs`` (name -> path; entries that are
    None or not local paths, such as hub ids, are skipped): writing it would replace or change what the
    command reads."""
    target = Path(out).expanduser().resolve()
    for name, given in inputs.items():
        if given is None or not Path(str(given)).expanduser().exists():
            continue
        source = Path(str(given)).expanduser().resolve()
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "holds"
        elif source in target.parents:
            how = "sits inside"
        else:
            continue
        raise DogeError(f"{what} {out} {how} the {name} {given}, which this command reads; choose an output "
                        "outside it")


def check_component(name: str, what: str = "--name") -> str:
    """``name`` if it is a single, ordinary path component, else a one-line DogeError."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".") or not re.fullmatch(r"[\w.+@=-]+", name)):
        raise DogeError(f"{what} {name!r} must be a plain name (letters, digits, . _ - + = @; no path "
                        "separators, not starting with a dot), e.g. my-corpus")
    return name


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, kind: str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it becomes ``final``.

    ``final`` must be absent, an empty folder or an earlier doge output (:func:`check_replaceable`,
    checked before the caller does any work and again before the swap). The marker is written into
    the new folder. On any failure the temporary folder is removed and ``final`` is left as it was;
    a full disk becomes a one-line :class:`DogeError`.
    """
    from doge_cli import __version__

    final = Path(final)
    check_replaceable(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DogeError(f"cannot create {final.parent}: {err.strerror}; choose a writable folder") from None
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        marker = {"kind": kind, "doge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "files": files_in(tmp)}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        check_replaceable(final)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        if is_disk_full(err):
            raise DogeError(f"disk full while writing {final}; free some space or choose another folder") from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_file_target(path: str | os.PathLike, *, is_ours: Callable[[Path], bool] | None = None,
                      what: str = "file") -> Path:
    """The checks before writing a file at ``path``: its folder exists, it is not a folder, and an
    existing file is replaced only when ``is_ours(path)`` recognises it as doge's."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DogeError(f"{what} {path} is a folder; give a file path")
    if not path.parent.is_dir():
        raise DogeError(f"folder {path.parent} does not exist; create it first or choose another path")
    if path.exists() and (is_ours is None or not is_ours(path)):
        raise DogeError(f"{what} {path} already exists and is not one doge wrote; choose another path "
                        "(doge replaces only files it created)")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file at; on success it is renamed to ``path``
    (atomically: a reader sees the old file or the whole new one). On failure it is removed and
    ``path`` is left as it was; a full disk or another OS error is a one-line :class:`DogeError`."""
    target = Path(path)
    if target.is_dir():
        raise DogeError(f"{target} is a folder; give a file path such as {target / 'config.yaml'}")
    if not target.parent.exists():
        raise DogeError(f"folder {target.parent} does not exist; create it first")
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a file is as readable as any the user writes
        os.replace(tmp, target)
    except OSError as err:
        if is_disk_full(err):
            raise DogeError(f"disk full while writing {target}; free some space or choose another folder") from None
        raise DogeError(f"could not write {target}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere it is set and
    restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """A text file, written through :func:`atomic_file`: never half-written."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON through :func:`write_text_atomic` (sorted keys, UTF-8, a final newline)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
