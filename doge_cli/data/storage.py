"""Atomic writes of datasets and manifests: everything is written to a temporary folder next to
its destination and renamed into place, so an interrupted or failed command leaves nothing partial."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doge_cli.errors import DogeError

MANIFEST = "manifest.json"


def _is_disk_full(err: BaseException | None) -> bool:
    # datasets and pyarrow sometimes wrap the OSError, so follow the cause chain.
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final``.

    On any failure the temporary folder is removed and ``final`` is left as it was. A full disk
    becomes a one-line :class:`DogeError`.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DogeError(f"cannot create {final.parent}: {err.strerror}; choose a writable folder") from err
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        if _is_disk_full(err):
            raise DogeError(
                f"disk full while writing {final}; free some space or choose another folder"
            ) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file in the same folder and rename it in place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(err):
            raise DogeError(f"disk full while writing {path}; free some space or choose another folder") from err
        raise


def save_dataset(ds, dest: Path, *, stage: str, source: str, revision: str | None = None, extra: dict | None = None,
                 jsonl: bool = False) -> dict:
    """Save ``ds`` with ``save_to_disk`` at ``dest`` plus a manifest.json, atomically.

    Returns the manifest: source, revision, rows, bytes, stage, columns and creation time.
    ``jsonl=True`` also writes ``test.jsonl`` (the form lighteval reads for local tasks).
    """
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        ds.save_to_disk(str(tmp))
        if jsonl:
            ds.to_json(str(tmp / "test.jsonl"), lines=True, force_ascii=False)
        manifest = {
            "source": source,
            "revision": revision,
            "stage": stage,
            "rows": len(ds),
            "columns": list(ds.column_names),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        manifest["bytes"] = folder_bytes(tmp)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a saved source, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
