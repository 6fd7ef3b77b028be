"""Launch configurations per device: the shared-memory estimate and the choice, with the properties of
real cards (no GPU needed)."""

from types import SimpleNamespace

import pytest
import torch

from doge_cli.kernels import launch
from doge_cli.kernels.launch import LaunchConfig, shared_memory_bytes

# Opt-in shared memory per block as CUDA reports it (cudaDevAttrMaxSharedMemoryPerBlockOptin).
CARDS = {
    "A100 (sm_80)": SimpleNamespace(major=8, minor=0, shared_memory_per_block_optin=166912, multi_processor_count=108),
    "RTX 3090 (sm_86)": SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376,
                                        multi_processor_count=82),
    "RTX 4090 (sm_89)": SimpleNamespace(major=8, minor=9, shared_memory_per_block_optin=101376,
                                        multi_processor_count=128),
    "H100 (sm_90)": SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=232448, multi_processor_count=132),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def test_the_formula_by_hand():
    # forward, bf16, D=128, 128x64 tiles, 3 stages: q tile 32 KiB + 3 x (k, v tiles 32 KiB + bias 256 B) + p 16 KiB
    assert shared_memory_bytes("forward", LaunchConfig(128, 64, 8, 3), 128, torch.bfloat16) == \
        32768 + 3 * (32768 + 256) + 16384
    # fp32 doubles every tile but not the fp32 bias / lse terms
    assert shared_memory_bytes("forward", LaunchConfig(64, 64, 4, 2), 128, torch.float32) == \
        32768 + 2 * (65536 + 256) + 16384
    # backward: the larger of dk/dv (k, v kept; q, dO, lse, delta staged; p and dS) and dq
    dkdv = 2 * 2 * 64 * 128 + 2 * (2 * 2 * 64 * 128 + 8 * 64) + 2 * 2 * 64 * 64
    dq = 2 * 2 * 64 * 128 + 2 * (2 * 2 * 64 * 128 + 4 * 64) + 2 * 64 * 64
    assert shared_memory_bytes("backward", LaunchConfig(64, 64, 8, 2), 128, torch.bfloat16) == max(dkdv, dq)
    # head dims round up to a power of two, at least 16
    assert launch.block_d(96) == 128 and launch.block_d(8) == 16 and launch.block_d(64) == 64


def test_the_old_fixed_forward_config_does_not_fit_a_4090():
    """The fixed configuration used before this choice (128x64, 3 stages) needs more than sm_89 has."""
    need = shared_memory_bytes("forward", LaunchConfig(128, 64, 8, 3), 128, torch.bfloat16)
    assert need > CARDS["RTX 4090 (sm_89)"].shared_memory_per_block_optin
    assert need <= CARDS["H100 (sm_90)"].shared_memory_per_block_optin


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", launch.KINDS)
def test_every_chosen_config_fits_its_card(card, head_dim, dtype, kind):
    props = CARDS[card]
    chosen = launch.choose(kind, head_dim, dtype, props)
    assert chosen, "nothing to try"
    for config in chosen:
        assert shared_memory_bytes(kind, config, head_dim, dtype) <= props.shared_memory_per_block_optin
    # the first is the fastest that fits: every candidate ranked above it does not
    first = launch.CANDIDATES[kind].index(chosen[0])
    for better in launch.CANDIDATES[kind][:first]:
        assert shared_memory_bytes(kind, better, head_dim, dtype) > props.shared_memory_per_block_optin


def test_smaller_cards_get_smaller_tiles():
    def first(card):
        return launch.choose("forward", 128, torch.bfloat16, CARDS[card])[0]
    assert first("H100 (sm_90)") == LaunchConfig(128, 64, 8, 3)
    assert first("A100 (sm_80)") == LaunchConfig(128, 64, 8, 3)
    assert first("RTX 4090 (sm_89)") == LaunchConfig(64, 64, 4, 2)


def test_the_limit_comes_from_the_capability_when_torch_does_not_report_it():
    assert launch.shared_memory_limit(SimpleNamespace(major=8, minor=9)) == 101376
    assert launch.shared_memory_limit(SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=None)) == 232448
    assert launch.shared_memory_limit(SimpleNamespace(major=11, minor=7)) == 101376  # unknown: the smallest


def test_when_nothing_fits_the_smallest_is_still_tried():
    tiny = SimpleNamespace(major=8, minor=0, shared_memory_per_block_optin=1024)
    assert launch.choose("forward", 128, torch.float32, tiny) == [launch.CANDIDATES["forward"][-1]]


def test_a_config_that_runs_out_of_resources_passes_to_the_next_once(monkeypatch, caplog):
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from doge_cli.kernels import _dma_triton

    configs = [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(16, 16, 2, 1)]
    monkeypatch.setattr(_dma_triton, "_configs", lambda kind, q: configs)
    monkeypatch.setattr(_dma_triton, "_CHOSEN", {})
    tried = []

    def run(cfg):
        tried.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] == 128:
            raise OutOfResources(148224, 101376, "shared memory")

    q = torch.zeros(1, 1, 4, 128, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="doge_cli.kernels._dma_triton"):
        _dma_triton._launch("forward", q, run)
        _dma_triton._launch("forward", q, run)  # the next call starts from the one that launched
    assert tried == [128, 64, 64]
    assert len(caplog.records) == 1 and "ran out of resources" in caplog.records[0].getMessage()

    def never(cfg):
        raise OutOfResources(1, 0, "shared memory")

    monkeypatch.setattr(_dma_triton, "_CHOSEN", {})
    with pytest.raises(OutOfResources):  # the last one's error is the one raised
        _dma_triton._launch("forward", q, never)
