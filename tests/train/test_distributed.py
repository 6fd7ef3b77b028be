"""Multi-process runs through accelerate (gloo on CPU) against the 1-process run: DDP, ZeRO-2, ZeRO-3."""

import pytest
import torch
from safetensors.torch import load_file

from .conftest import launch_train, tiny_overrides

# Clipping that bites (DeepSpeed must clip with optim.max_grad_norm, not its own 1.0), and 3 eval
# micro-batches over 2 processes: one process has fewer rows and must still run as many forwards
# (ZeRO-3 gathers the weights in every forward; an uneven count used to hang).
SETTINGS = {"runtime.micro_batch_size": 1, "logging.eval_every": 4, "logging.eval_batches": 3,
            "optim.max_grad_norm": 0.05, "checkpoint.every": 2}


def doge_train(pt_data, out, accelerate_config=None):
    return launch_train("pt", tiny_overrides(pt_data, out, steps=4, **SETTINGS), out, accelerate_config)


@pytest.fixture(scope="module")
def single(pt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return out, doge_train(pt_data, out)[1]


@pytest.mark.parametrize("launcher", ["ddp_cpu.yaml", "zero2.yaml", "zero3.yaml"])
def test_two_processes_match_one(pt_data, tmp_path, single, launcher):
    stdout, records = doge_train(pt_data, tmp_path / "run", launcher)
    assert "x 2 processes" in stdout, stdout
    ref_dir, ref = single
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ref], rel=1e-4)
    # The logged norm is this step's pre-clipping norm (above 0.05, so clipping acted) on every launcher.
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-3)
    assert min(r["grad_norm"] for r in ref) > 0.05
    assert records[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-4)
    a = load_file(str(ref_dir / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key
    # Every process saved its own RNG state and unlogged sums.
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / "rank-00000.pt").is_file() and (ckpt / "rank-00001.pt").is_file()
    states = [torch.load(ckpt / f"rank-0000{r}.pt", weights_only=True) for r in (0, 1)]
    assert all("rng" in s and "window" in s for s in states)


def test_two_processes_read_the_token_stream_as_one(pt_stream_data, tmp_path):
    """The block index read by two DDP processes (each its own file handles): the one-process losses."""
    one = launch_train("pt", tiny_overrides(pt_stream_data, tmp_path / "one", steps=4, **SETTINGS), tmp_path / "one")[1]
    two = doge_train(pt_stream_data, tmp_path / "two", "ddp_cpu.yaml")[1]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-4)
