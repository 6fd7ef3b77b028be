import numpy as np
import pytest

from tests.data.reference_packing import BlockPacker, pack_documents

EOS, PAD = 1, 0


def _docs(rng, n):
    return [rng.integers(2, 100, size=int(rng.integers(1, 40)), dtype=np.int32) for _ in range(n)]


@pytest.mark.parametrize("max_length", [8, 16, 37])
def test_packing_keeps_every_token_and_boundaries(max_length):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 50)
    blocks = list(pack_documents(docs, max_length, EOS, PAD))
    ids = np.concatenate([b[0] for b in blocks])
    pos = np.concatenate([b[1] for b in blocks])
    assert ids.shape[1] == max_length and pos.shape == ids.shape
    flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
    n_real = sum(len(d) + 1 for d in docs)
    # Every token, each document followed by EOS, in order; only padding after.
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    assert np.array_equal(flat_ids[:n_real], expected)
    assert np.all(flat_ids[n_real:] == PAD) and len(flat_ids) - n_real < max_length
    # Positions restart at each document start and each block start, and count up otherwise.
    starts = np.zeros(len(flat_ids), bool)
    starts[np.cumsum([0] + [len(d) + 1 for d in docs])[:-1]] = True
    starts[::max_length] = True
    starts[n_real] = n_real < len(flat_ids)  # padding is its own segment
    assert np.array_equal(flat_pos == 0, starts)
    steps = np.diff(flat_pos)
    assert np.all((steps == 1) | starts[1:])


def test_blocks_span_batches_like_one_batch():
    rng = np.random.default_rng(1)
    docs = _docs(rng, 40)
    one = list(pack_documents(docs, 16, EOS, PAD))
    packer = BlockPacker(16, EOS, PAD)
    parts = [packer.add(docs[:13]), packer.add(docs[13:]), packer.finish()]
    parts = [p for p in parts if p is not None]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), np.concatenate([b[0] for b in one]))
    assert np.array_equal(np.concatenate([p[1] for p in parts]), np.concatenate([b[1] for b in one]))


def test_document_ids_from_positions():
    docs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    (ids, pos), = list(pack_documents(docs, 8, EOS, PAD))
    assert ids.tolist() == [[5, 6, 7, EOS, 8, EOS, PAD, PAD]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1]]
    assert np.cumsum(pos[0] == 0).tolist() == [1, 1, 1, 1, 2, 2, 3, 3]
