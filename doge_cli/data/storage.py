"""Datasets on disk: each saved with ``save_to_disk`` plus a manifest.json, through
:func:`doge_cli.io.atomic_dir` (complete or absent; only doge's own folders are replaced)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from doge_cli.io import atomic_dir, read_json_object, write_json

MANIFEST = "manifest.json"


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def save_dataset(ds, dest: Path, *, stage: str, source: str, revision: str | None = None, extra: dict | None = None,
                 jsonl: bool = False) -> dict:
    """Save ``ds`` with ``save_to_disk`` at ``dest`` plus a manifest.json, atomically.

    Returns the manifest: source, revision, rows, bytes, stage, columns and creation time.
    ``jsonl=True`` also writes ``test.jsonl`` (the form lighteval reads for local tasks).
    """
    dest = Path(dest)
    with atomic_dir(dest, kind=f"{stage} dataset") as tmp:
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
    """The manifest of a saved source, or None when there is none or it is unreadable (a damaged
    manifest makes the folder count as not written by doge's data commands)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return read_json_object(path)


@contextlib.contextmanager
def inputs_untouched() -> Iterator[None]:
    """``datasets`` writes the results of ``map``, ``filter`` and ``flatten_indices`` as cache files next
    to the source's Arrow files; with its caching off it writes them to a temporary folder it removes
    instead. The data commands run under this, so the folders they read are left exactly as they were."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()
