"""Checkpoint averaging (doge_cli.train.average, ``doge average``): weights, exactness, refusals, and an
output that loads in transformers and doge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from doge_cli.errors import DogeError
from doge_cli.train.average import average, weights_for
from tests.cli.helpers import run_doge


def tiny_model(seed: int, hidden: int = 32):
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM

    config = DogeConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        keep_window_size=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = DogeForCausalLM(config, attn_implementation="eager")
    with torch.no_grad():
        model.model.layers[0].self_attn.A.normal_()  # A starts at 0: make every tensor differ between seeds
    return model


def fake_run(root: Path, seeds: list[int], hidden: int = 32) -> Path:
    """A run folder as training leaves it: checkpoints (model.safetensors + state.json) and final/."""
    from doge_cli.model import save_pretrained

    run = root / "run"
    for step, seed in enumerate(seeds, 1):
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        state = tiny_model(seed, hidden).state_dict()
        state.pop("lm_head.weight")
        save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
    save_pretrained(tiny_model(seeds[-1], hidden), run / "final")
    return run


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_the_weightings():
    assert weights_for("sma", 4) == [0.25] * 4
    # EMA as the paper (arXiv 2505.12082) defines it: M_1 = W_1, M_i = alpha W_i + (1 - alpha) M_(i-1). Run
    # that recursion on one-hot "models" and read each source's weight off the result.
    for alpha, n in ((0.3, 4), (0.2, 1), (0.5, 2), (0.9, 6)):
        m = [1.0] + [0.0] * (n - 1)
        for i in range(1, n):
            m = [alpha * (j == i) + (1 - alpha) * x for j, x in enumerate(m)]
        assert weights_for("ema", n, alpha) == pytest.approx(m, rel=1e-12)
    assert weights_for("ema", 4, 0.3)[0] == pytest.approx(0.7**3)  # the oldest starts the recursion
    assert weights_for("wma", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert sum(weights_for("ema", 7, 0.2)) == pytest.approx(1.0)
    with pytest.raises(DogeError, match="--alpha"):
        weights_for("ema", 3, 0.0)


@pytest.mark.parametrize("method", ["sma", "ema", "wma"])
def test_identical_checkpoints_average_to_themselves_bit_for_bit(tmp_path, method):
    run = fake_run(tmp_path, [5, 5, 5])
    out = average([ckpt(run, s) for s in (1, 2, 3)], method, tmp_path / "avg")
    want, got = weights_of(ckpt(run, 1)), weights_of(out)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_sma_of_two_is_the_midpoint_and_ema_follows_its_weights(tmp_path):
    run = fake_run(tmp_path, [1, 2, 3])
    a, b, c = (weights_of(ckpt(run, s)) for s in (1, 2, 3))
    mid = weights_of(average([ckpt(run, 1), ckpt(run, 2)], "sma", tmp_path / "sma"))
    for key in a:
        assert torch.equal(mid[key], ((a[key].double() + b[key].double()) / 2).float()), key
    w = weights_for("ema", 3, 0.2)
    ema = weights_of(average([ckpt(run, 3), ckpt(run, 1), ckpt(run, 2)], "ema", tmp_path / "ema"))  # any order
    for key in a:  # the recursion itself, in float64, on the checkpoints in step order
        m = a[key].double()
        for later in (b, c):
            m = 0.2 * later[key].double() + 0.8 * m
        torch.testing.assert_close(ema[key].double(), m, rtol=1e-6, atol=1e-9)  # float32 rounding of the sum
    record = json.loads((tmp_path / "ema" / "averaging.json").read_text())
    assert [s["path"].rsplit("/", 1)[-1] for s in record["sources"]] == ["step-000001", "step-000002", "step-000003"]
    assert [s["weight"] for s in record["sources"]] == pytest.approx(w)


def test_the_average_loads_in_transformers_and_doge_with_the_same_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from doge_cli.model import load_model

    run = fake_run(tmp_path, [1, 2])
    code, out, err = run_doge(capsys, "average", "--run", str(run), "--last", "2", "--method", "wma",
                              "--out", str(tmp_path / "avg"))
    assert code == 0, err
    assert out.strip() == f"averaged 2 checkpoints (wma) into {tmp_path / 'avg'}"
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "avg", attn_implementation="eager").eval()
    ours = load_model(str(tmp_path / "avg"), attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)


def test_mismatched_checkpoints_are_refused(tmp_path):
    small, big = fake_run(tmp_path / "a", [1], hidden=32), fake_run(tmp_path / "b", [2], hidden=64)
    with pytest.raises(DogeError) as err:
        average([ckpt(small, 1), ckpt(big, 1)], "sma", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "does not match" in message and "average checkpoints of one model" in message
    assert not (tmp_path / "out").exists()
