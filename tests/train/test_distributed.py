"""Multi-process runs through accelerate (gloo on CPU) against the 1-process run: DDP, ZeRO-2, ZeRO-3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def doge_train(pt_data, out, accelerate_config=None):
    args = [sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu",
            *tiny_overrides(pt_data, out, steps=4, **{"runtime.micro_batch_size": 1, "logging.eval_every": 4})]
    if accelerate_config:
        args += ["--accelerate-config", str(ROOT / "configs" / "accelerate" / accelerate_config)]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


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
