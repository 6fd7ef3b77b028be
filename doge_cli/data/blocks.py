"""Pretraining tokens on disk: 2 bytes a token, blocks read by position, memory flat in the corpus size.

**A tokenized pretraining source** is one token stream: every document's tokens followed by EOS, end to
end, in the order of the raw rows. It lives in shard folders, ``<source>/shard-IIIII-of-NNNNN/``, each
the stream of a contiguous range of raw rows (one shard when one machine tokenizes the source; N when
``doge data tokenize --shard i/N`` splits it across machines). A shard holds

- ``tokens.bin``: the token ids, little-endian ``uint16`` when the vocabulary has at most 65,536 tokens,
  else ``uint32``;
- ``starts.bin``: one bit per token (``numpy.packbits`` order), set where a document starts;
- ``manifest.json``: the cache key, the shard's row range, its token and document counts.

That is 2.125 bytes a token for a 32k vocabulary (the int32 ``input_ids`` and ``position_ids`` columns
this replaces took 8).

**Blocks** are a view of the stream: block ``b`` is tokens ``b * L .. (b + 1) * L`` of the shards laid end
to end, whichever shards they come from, so N shards give exactly the blocks of one run. Positions
restart at every document start and at every block start; the last block is padded with the pad token,
the padding being a document of its own. These are the rows the former ``input_ids`` / ``position_ids``
columns held, value for value (tests/data/test_blocks.py checks them against that packer).

**Reads** are ``os.pread`` calls at computed offsets: no memory map, so reading the corpus does not grow
the process's resident memory, and forked data-loader workers share nothing but the file descriptors.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doge_cli.errors import DogeError

FORMAT = "doge-token-stream"
INDEX_FORMAT = "doge-block-index"
VERSION = 1
SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``, or a one-line DogeError."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise DogeError(f"bad --shard {text!r}; write INDEX/COUNT with 0 <= INDEX < COUNT, e.g. --shard 0/4")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count or count > 99_999:
        raise DogeError(f"--shard {text}: the index must be at least 0 and below the count (at most 99,999 shards), "
                        "e.g. --shard 0/4 .. --shard 3/4")
    return index, count


def shard_rows(rows: int, index: int, count: int) -> tuple[int, int]:
    """The raw rows ``[lo, hi)`` that shard ``index`` of ``count`` tokenizes."""
    return rows * index // count, rows * (index + 1) // count


# ----------------------------------------------------------------------------------------- writing


class StreamWriter:
    """Appends documents to a shard folder's ``tokens.bin`` / ``starts.bin``.

    :meth:`state` is what a resumed run needs (bytes of each file, the start bits not yet a whole byte);
    :meth:`resume` truncates the files to a saved state, dropping whatever was written after it.
    """

    def __init__(self, folder: Path, dtype: np.dtype, eos_id: int):
        self.folder, self.dtype, self.eos_id = Path(folder), np.dtype(dtype), eos_id
        self.tokens = self.documents = 0
        self._carry = np.zeros(0, dtype=bool)
        self._tok = open(self.folder / "tokens.bin", "ab")
        self._bits = open(self.folder / "starts.bin", "ab")
        self._limit = np.iinfo(self.dtype).max

    def resume(self, state: dict) -> None:
        self.flush()
        tok_bytes, bit_bytes = int(state["tokens"]) * self.dtype.itemsize, int(state["tokens"]) // 8
        for f, size in ((self._tok, tok_bytes), (self._bits, bit_bytes)):
            if os.fstat(f.fileno()).st_size < size:
                raise DogeError(f"{self.folder} is shorter than its progress file says; delete it and run again")
            f.truncate(size)
            f.seek(size)
        self.tokens, self.documents = int(state["tokens"]), int(state["documents"])
        self._carry = np.array(state["carry"], dtype=bool)

    def state(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "carry": self._carry.astype(int).tolist()}

    def append(self, docs: list[np.ndarray]) -> None:
        """Add documents (token ids without EOS); each gets EOS after it."""
        if not docs:
            return
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        ends = np.cumsum(lengths)
        ids = np.empty(int(ends[-1]), dtype=np.int64)
        starts = np.zeros(len(ids), dtype=bool)
        first = ends - lengths
        starts[first] = True
        ids[ends - 1] = self.eos_id
        body = np.concatenate(docs) if any(len(d) for d in docs) else np.zeros(0, dtype=np.int64)
        mask = np.ones(len(ids), dtype=bool)
        mask[ends - 1] = False
        ids[mask] = body
        if len(ids) and (ids.min() < 0 or ids.max() > self._limit):
            raise DogeError(f"a token id ({int(ids.max())}) does not fit in {self.dtype.name}; the tokenizer's "
                            "vocabulary does not match its ids")
        self._tok.write(ids.astype(self.dtype).tobytes())
        bits = np.concatenate((self._carry, starts))
        whole = len(bits) // 8 * 8
        self._bits.write(np.packbits(bits[:whole]).tobytes())
        self._carry = bits[whole:]
        self.tokens += len(ids)
        self.documents += len(docs)

    def flush(self, sync: bool = False) -> None:
        for f in (self._tok, self._bits):
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def close(self) -> None:
        """Write the last partial byte of start bits and close the files."""
        if len(self._carry):
            self._bits.write(np.packbits(self._carry).tobytes())
            self._carry = np.zeros(0, dtype=bool)
        self.flush(sync=True)
        self._tok.close()
        self._bits.close()


# ----------------------------------------------------------------------------------------- reading


@dataclass
class _Shard:
    folder: Path
    tokens: int
    offset: int  # of its first token in the source's stream


class TokenStream:
    """A tokenized pretraining source (all its shards), read by token position with ``os.pread``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        shards, manifests = read_shards(self.folder)
        first = manifests[0]
        self.dtype = np.dtype(first["dtype"])
        self.max_length, self.pad_id = int(first["max_length"]), int(first["pad_id"])
        self.cache_key = first["cache_key"]
        self.build_ids = [m["build_id"] for m in manifests]
        self.shards, offset = [], 0
        for folder, manifest in zip(shards, manifests):
            self.shards.append(_Shard(folder, int(manifest["tokens"]), offset))
            offset += int(manifest["tokens"])
        self.tokens = offset
        self.documents = sum(int(m["documents"]) for m in manifests)
        self._offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        self._fds: dict[tuple[int, Path, str], int] = {}

    @property
    def blocks(self) -> int:
        return -(-self.tokens // self.max_length)

    def _fd(self, shard: _Shard, name: str) -> int:
        key = (os.getpid(), shard.folder, name)  # a forked worker opens its own
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = os.open(shard.folder / name, os.O_RDONLY)
        return fd

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and document-start flags of stream positions ``start .. stop``."""
        ids = np.empty(stop - start, dtype=np.int64)
        starts = np.empty(stop - start, dtype=bool)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        at = start
        for shard in self.shards[first:]:
            if at >= stop:
                break
            lo, hi = at - shard.offset, min(stop, shard.offset + shard.tokens) - shard.offset
            if hi <= lo:
                continue
            size = self.dtype.itemsize
            raw = os.pread(self._fd(shard, "tokens.bin"), (hi - lo) * size, lo * size)
            if len(raw) != (hi - lo) * size:
                raise DogeError(f"{shard.folder / 'tokens.bin'} is shorter than its manifest says; re-run "
                                "`doge data tokenize --stage pt`")
            ids[at - start:at - start + hi - lo] = np.frombuffer(raw, dtype=self.dtype)
            byte_lo, byte_hi = lo // 8, -(-hi // 8)
            bits = np.unpackbits(np.frombuffer(os.pread(self._fd(shard, "starts.bin"), byte_hi - byte_lo, byte_lo),
                                               dtype=np.uint8))
            starts[at - start:at - start + hi - lo] = bits[lo - byte_lo * 8:hi - byte_lo * 8]
            at = shard.offset + hi
        return ids, starts

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, position_ids)`` of block ``b``, int64, ``max_length`` each."""
        length = self.max_length
        lo = b * length
        if not 0 <= lo < self.tokens:
            raise IndexError(f"block {b} of {self.blocks}")
        hi = min(lo + length, self.tokens)
        ids, starts = self.read(lo, hi)
        if hi - lo < length:  # the last block: padding, a document of its own
            pad = length - (hi - lo)
            ids = np.concatenate((ids, np.full(pad, self.pad_id, dtype=np.int64)))
            starts = np.concatenate((starts, np.zeros(pad, dtype=bool)))
            starts[hi - lo] = True
        starts[0] = True  # a block starts a document for attention, even mid-document
        idx = np.arange(length, dtype=np.int64)
        return ids, idx - np.maximum.accumulate(np.where(starts, idx, 0))

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def read_shards(folder: Path) -> tuple[list[Path], list[dict]]:
    """The finished shard folders of a tokenized pretraining source and their manifests, checked to be one
    complete, consistent set; else a one-line DogeError saying what to re-run."""
    from doge_cli.io import read_json_object

    folder = Path(folder)
    found = sorted(p for p in folder.glob("shard-*-of-*") if p.is_dir() and SHARD_RE.fullmatch(p.name))
    if not found:
        if (folder / "state.json").is_file():
            raise DogeError(f"{folder} holds pretraining data in the older int32 column format; re-run "
                            "`doge data tokenize --stage pt` (the new format takes 2 bytes a token)")
        raise DogeError(f"{folder} holds no tokenized shards; run `doge data tokenize --stage pt`")
    manifests = []
    for shard in found:
        m = read_json_object(shard / "manifest.json") if (shard / "manifest.json").is_file() else None
        if not m or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DogeError(f"{shard} has no readable manifest of this doge version; re-run "
                            "`doge data tokenize --stage pt`")
        manifests.append(m)
    counts = {SHARD_RE.fullmatch(p.name).group(2) for p in found}
    if len(counts) > 1:
        raise DogeError(f"{folder} mixes shards of different splits ({', '.join(p.name for p in found)}); delete the "
                        "stale ones and re-run the missing `doge data tokenize --shard i/N`")
    count = int(counts.pop())
    have = {int(SHARD_RE.fullmatch(p.name).group(1)) for p in found}
    missing = [i for i in range(count) if i not in have]
    if missing:
        raise DogeError(f"{folder} lacks shard {missing[0]} of {count} (found {len(have)}); run "
                        f"`doge data tokenize --stage pt --shard {missing[0]}/{count}` (or copy its folder here)")
    keys = {json.dumps(m["cache_key"], sort_keys=True) for m in manifests}
    if len(keys) > 1:
        raise DogeError(f"the shards of {folder} were tokenized with different settings, tokenizers or raw data; "
                        "re-run `doge data tokenize --stage pt --shard i/N` for every shard with the same ones")
    return found, manifests


def new_build_id() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------- merged index


class BlockRows:
    """Rows of a merged pretraining split: an index of ``(source, block)`` pairs over the tokenized
    sources. Indexing follows ``datasets.Dataset`` as the trainer uses it: ``rows[i]`` is a dict of one
    row, ``rows[list or slice]`` a dict of columns."""

    column_names = ["input_ids", "position_ids"]

    def __init__(self, streams: list[TokenStream], source: np.ndarray, block: np.ndarray):
        self.streams, self.source, self.block = streams, source, block

    def __len__(self) -> int:
        return len(self.block)

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.streams[int(self.source[i])].block(int(self.block[i]))

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            ids, pos = self._row(int(key) % len(self))
            return {"input_ids": ids, "position_ids": pos}
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        rows = [self._row(int(i)) for i in key]
        return {"input_ids": [r[0] for r in rows], "position_ids": [r[1] for r in rows]}


def open_merged(path: Path) -> dict[str, BlockRows] | None:
    """The splits of a merged pretraining folder written as a block index, or None for any other folder
    (a ``datasets`` DatasetDict: older merges, or a user's own)."""
    from doge_cli.io import read_json_object

    path = Path(path)
    manifest = read_json_object(path / "manifest.json") if (path / "manifest.json").is_file() else None
    if not manifest or manifest.get("format") != INDEX_FORMAT:
        return None
    if manifest.get("version") != VERSION:
        raise DogeError(f"{path} was merged by another doge version; re-run `doge data merge --stage pt`")
    streams = []
    for name, info in manifest["sources"].items():
        folder = (path / info["path"]).resolve()
        if not folder.is_dir():
            raise DogeError(f"{path} indexes the tokenized source {name} at {folder}, which is missing; keep the "
                            "datasets folder together (tokenized/ beside merged/) or re-run `doge data tokenize` and "
                            "`doge data merge`")
        stream = TokenStream(folder)
        if stream.build_ids != info["build_ids"]:
            raise DogeError(f"the tokenized source {name} changed after {path} was merged; re-run "
                            "`doge data merge --stage pt`")
        streams.append(stream)
    splits = {}
    for split in ("train", "test"):
        source_file, block_file = path / f"{split}-source.npy", path / f"{split}-block.npy"
        if source_file.is_file() and block_file.is_file():
            splits[split] = BlockRows(streams, np.load(source_file), np.load(block_file))
    return splits
