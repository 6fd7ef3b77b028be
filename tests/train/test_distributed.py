"""Multi-process runs through accelerate (gloo on CPU) against the 1-process run: DDP, ZeRO-2, ZeRO-3."""

import pytest
import torch
from safetensors.torch import load_file

from .conftest import launch_train, tiny_overrides


def doge_train(pt_data, out, accelerate_config=None):
    overrides = tiny_overrides(pt_data, out, steps=4, **{"runtime.micro_batch_size": 1, "logging.eval_every": 4})
    return launch_train("pt", overrides, out, accelerate_config)


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
    assert records[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-4)
    a = load_file(str(ref_dir / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key
