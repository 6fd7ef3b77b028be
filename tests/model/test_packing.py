"""Packed rows: three documents in one row give each document's own logits, in every backend."""

from __future__ import annotations

import pytest
import torch

from .doge_twin import BACKENDS, hf_twin, ours_from, rel_err, skip_unavailable, tiny_config


@pytest.mark.parametrize("keep_window_size", [2048, 6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_match_documents_alone(backend, keep_window_size):
    skip_unavailable(backend)
    ours = ours_from(hf_twin(tiny_config(keep_window_size=keep_window_size)), backend)
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 128, (1, n), generator=gen) for n in (7, 11, 9)]
    row = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed = ours(row, position_ids=position_ids).logits
        alone = torch.cat([ours(d).logits for d in docs], dim=1)
        unpacked = ours(row).logits  # no position_ids: one long document
    assert rel_err(packed, alone) <= 1e-5
    assert rel_err(unpacked[:, 7:], alone[:, 7:]) > 1e-3  # the test can tell packing from no packing
