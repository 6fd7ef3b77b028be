"""Saved datasets read and written a batch at a time, in the layout ``datasets.save_to_disk`` writes.

The data commands stream: they read a source with ordinary file reads (:func:`iter_batches`, one Arrow
record batch in memory at a time, never a memory map whose touched pages would count towards the
process's memory as it reads on) and write through :class:`DatasetWriter`, which appends record batches
to Arrow stream files and finishes the folder with the ``state.json`` and ``dataset_info.json`` that
``datasets.load_from_disk`` reads. So a command's memory is a batch, whatever the size of the corpus.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

SHARD_BYTES = 512 * 2**20  # a new Arrow file after this many bytes, as save_to_disk's shards


def data_files(folder: Path) -> list[Path]:
    """The Arrow files of a folder written by ``save_to_disk`` (or :class:`DatasetWriter`), in order."""
    state = json.loads((Path(folder) / "state.json").read_text(encoding="utf-8"))
    return [Path(folder) / f["filename"] for f in state["_data_files"]]


def count_rows(folder: Path) -> int:
    """Rows of a saved dataset (read from the Arrow files' metadata through a memory map: no rows are read)."""
    import pyarrow as pa

    total = 0
    for path in data_files(folder):
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            for batch in reader:
                total += batch.num_rows  # a zero-copy view: the pages of the data are not touched
    return total


def iter_batches(folder: Path, batch_size: int, *, columns: list[str] | None = None, start: int = 0,
                 stop: int | None = None) -> Iterator:
    """Rows ``start .. stop`` of a saved dataset as ``pyarrow.Table`` batches of ``batch_size`` rows (the last
    may be shorter), read with plain file reads."""
    import pyarrow as pa

    pending: list = []
    pending_rows = 0
    row = 0
    for path in data_files(folder):
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                n = batch.num_rows
                lo, hi = max(start - row, 0), n if stop is None else min(n, stop - row)
                row += n
                if hi <= lo:
                    if stop is not None and row >= stop:
                        break
                    continue
                batch = batch.slice(lo, hi - lo)
                if columns is not None:
                    batch = batch.select(columns)
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, batch_size).combine_chunks()
                    rest = table.slice(batch_size)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
                if stop is not None and row >= stop:
                    break
        if stop is not None and row >= stop:
            break
    if pending_rows:
        yield pa.Table.from_batches(pending).combine_chunks()


class DatasetWriter:
    """Appends ``pyarrow`` tables of one schema to a folder that ``datasets.load_from_disk`` opens.

    Files are ``data-NNNNN-of-MMMMM.arrow`` (named when the count is known, at :meth:`close`), a new one
    every :data:`SHARD_BYTES`.
    """

    def __init__(self, folder: Path, schema, shard_bytes: int = SHARD_BYTES):
        self.folder, self.schema, self.shard_bytes = Path(folder), schema, shard_bytes
        self.rows = 0
        self._files: list[Path] = []
        self._sink = self._writer = None
        self._bytes = 0

    def _open(self) -> None:
        import pyarrow as pa

        path = self.folder / f".shard-{len(self._files):05d}.arrow"
        self._files.append(path)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._bytes = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def write(self, table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None or self._bytes >= self.shard_bytes:
            self._close_file()
            self._open()
        table = table.cast(self.schema) if table.schema != self.schema else table
        for batch in table.to_batches(max_chunksize=1000):
            self._writer.write_batch(batch)
        self._bytes += table.nbytes
        self.rows += table.num_rows

    def close(self) -> int:
        """Finish the folder; returns the number of rows written."""
        import datasets

        if self._writer is None and not self._files:
            self._open()  # an empty dataset still gets one (empty) file
        self._close_file()
        names = []
        for i, path in enumerate(self._files):
            name = f"data-{i:05d}-of-{len(self._files):05d}.arrow"
            os.replace(path, self.folder / name)
            names.append(name)
        state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": uuid.uuid4().hex[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
        datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(self.schema)).write_to_directory(
            str(self.folder), pretty_print=True)
        return self.rows
