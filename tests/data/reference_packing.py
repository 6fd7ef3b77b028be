"""The packer of doge's former pretraining format (int32 ``input_ids`` / ``position_ids`` columns), kept as
the oracle of the token-stream format: the blocks ``doge_cli.data.blocks`` reads must equal these.

Packing token streams into fixed-length blocks with document boundaries kept.

Documents are laid end to end, each ending with EOS, and cut into ``max_length`` blocks instead
of being truncated and padded one by one, so no token is lost. ``position_ids`` restart at 0 at
every document start and at every block start; a model recovers document ids as
``cumsum(position_ids == 0)`` and masks attention across documents.

The last, partial block is kept: it is filled with the pad token, and the padding is its own
"document" (positions restart at 0), so it cannot be attended to by real tokens. Trainers find it
as the row's last document when that holds only pad tokens
(``doge_cli.train.objectives.lm.padding_targets``), which stays right when pad and EOS are one token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


class BlockPacker:
    """Accumulates documents (arrays of token ids) and yields full ``(input_ids, position_ids)`` blocks.

    Tokens left over after a batch wait for the next one, so blocks span batch borders.
    """

    def __init__(self, max_length: int, eos_id: int | None, pad_id: int):
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.max_length = max_length
        self.eos_id = eos_id
        self.pad_id = pad_id
        self._ids = np.empty(0, dtype=np.int32)
        self._pos = np.empty(0, dtype=np.int32)

    def add(self, docs: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """Add documents; return the full blocks now available as two (n, max_length) arrays, or None."""
        docs = list(docs)
        if not docs:
            return None
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        if self.eos_id is not None:
            ends = np.cumsum(lengths)
            ids = np.insert(np.concatenate(docs).astype(np.int32, copy=False), ends, self.eos_id)
            lengths = lengths + 1
        else:
            ids = np.concatenate(docs).astype(np.int32, copy=False)
        # Position = distance from the most recent document start or block start.
        starts = np.zeros(len(ids), dtype=bool)
        starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
        pos = _positions(starts)
        ids = np.concatenate((self._ids, ids))
        pos = np.concatenate((self._pos, pos))
        n_full = len(ids) // self.max_length
        cut = n_full * self.max_length
        self._ids, self._pos = ids[cut:], pos[cut:]
        if n_full == 0:
            return None
        blocks_ids = ids[:cut].reshape(n_full, self.max_length)
        return blocks_ids, _restart_rows(pos[:cut].reshape(n_full, self.max_length))

    def finish(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last partial block, padded (see the module docstring), or None when nothing is left."""
        n = len(self._ids)
        if n == 0:
            return None
        pad = self.max_length - n
        ids = np.concatenate((self._ids, np.full(pad, self.pad_id, dtype=np.int32)))
        pos = np.concatenate((self._pos, np.arange(pad, dtype=np.int32)))
        self._ids = self._pos = np.empty(0, dtype=np.int32)
        return ids[None, :], _restart_rows(pos[None, :])


def _positions(starts: np.ndarray) -> np.ndarray:
    idx = np.arange(len(starts), dtype=np.int64)
    last = np.maximum.accumulate(np.where(starts, idx, 0))
    return (idx - last).astype(np.int32)


def _restart_rows(pos: np.ndarray) -> np.ndarray:
    # A document cut by a block border continues in the next block from position 0.
    first = pos[:, :1]
    out = pos.copy()
    # Within a row, tokens before the first document start are the carried-over tail: shift them to 0.
    is_start = pos == 0
    has_start = is_start.any(axis=1)
    first_start = np.where(has_start, is_start.argmax(axis=1), pos.shape[1])
    cols = np.arange(pos.shape[1])
    tail = cols[None, :] < first_start[:, None]
    out = np.where(tail, pos - first, out)
    return out.astype(np.int32)


def pack_documents(docs: Iterable[np.ndarray], max_length: int, eos_id: int | None, pad_id: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pack all ``docs`` at once; yields (input_ids, position_ids) block arrays, the padded tail last."""
    packer = BlockPacker(max_length, eos_id, pad_id)
    out = packer.add(docs)
    if out is not None:
        yield out
    tail = packer.finish()
    if tail is not None:
        yield tail
