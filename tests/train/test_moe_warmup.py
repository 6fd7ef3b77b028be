"""train.moe_warmup_steps on an upcycled CDMoE model: during the warm-up only the router and expert
embeddings move (the rest bit for bit, and the optimizer holds no state for it), afterwards everything
trains, in one run; a resume inside or after the warm-up equals the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.model.upcycle import NEW_TENSORS
from doge_cli.train.core import train
from doge_cli.train.objectives import objective_for

from .conftest import BLOCK, tiny_overrides

STEPS, WARMUP = 4, 2


@pytest.fixture(scope="module")
def upcycled(pt_data, tmp_path_factory):
    from transformers import AutoTokenizer, DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.model.upcycle import upcycle

    root = tmp_path_factory.mktemp("moe")
    tok = AutoTokenizer.from_pretrained(pt_data.parent / "tokenizer")
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=BLOCK,
                        keep_window_size=BLOCK, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_pretrained(DogeForCausalLM(config), root / "dense", tokenizer=tok)
    return upcycle(str(root / "dense"), root / "moe", num_experts=16, experts_per_token=4, init="normal")


def run(pt_data, init, out, resume=None, stop_after=None, warmup=WARMUP):
    overrides = tiny_overrides(pt_data, out, steps=STEPS, **{"train.moe_warmup_steps": warmup, "init_from": init,
                                                             "checkpoint.every": 1, "checkpoint.keep_last": 10})
    cfg = resolve_config("pt", hardware="cpu", overrides=overrides)
    return train(cfg, objective_for(cfg), resume=resume, stop_after=stop_after)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def is_expert(name: str) -> bool:
    return name.endswith(NEW_TENSORS)


def test_only_the_experts_train_during_the_warmup_then_everything(pt_data, upcycled, tmp_path):
    out = tmp_path / "run"
    run(pt_data, str(upcycled), out)
    start = weights(upcycled)
    ckpts = [weights(out / "checkpoints" / f"step-{s:06d}") for s in range(1, STEPS + 1)]
    experts = [k for k in start if is_expert(k)]
    dense = [k for k in start if not is_expert(k) and k in ckpts[0]]
    assert experts and dense
    for state in ckpts[:WARMUP]:
        for key in dense:
            assert torch.equal(state[key], start[key]), key  # bit for bit
        assert all(not torch.equal(state[k], start[k]) for k in experts)
    moved = [k for k in dense if not torch.equal(ckpts[WARMUP][k], start[k])]
    assert len(moved) == len(dense)  # the first step after the warm-up moves every tensor
    optimizer = torch.load(out / "checkpoints" / f"step-{WARMUP:06d}" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(experts)  # no state for what did not train
    later = torch.load(out / "checkpoints" / f"step-{WARMUP + 1:06d}" / "optimizer.pt", weights_only=True)
    assert len(later["state"]) > len(experts)


def test_the_run_records_the_loaded_moe_model_and_logs_the_router_loss(pt_data, upcycled, tmp_path):
    import json

    import yaml

    out = tmp_path / "run"
    run(pt_data, str(upcycled), out)
    model = yaml.safe_load((out / "config.yaml").read_text())["model"]
    # the start model's shape, not the size preset's dense one
    assert (model["is_moe"], model["num_experts"], model["num_experts_per_tok"], model["hidden_size"]) == \
        (True, 16, 4, 32)
    assert model["router_aux_loss_coef"] == 0.001
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aux = [r["aux_loss"] for r in records if "aux_loss" in r]
    assert len(aux) == STEPS and all(0 < a < 0.01 for a in aux)  # coefficient x a loss of order 1
    # the trained CDMoE model loads in plain transformers and computes doge's logits
    from transformers import AutoModelForCausalLM

    from doge_cli.model import load_model

    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(out / "final", attn_implementation="eager").eval()
    ours = load_model(str(out / "final"), attn_implementation="eager").eval()
    assert theirs.config.is_moe and theirs.config.num_experts == 16
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stop_after", [1, 3])  # inside the warm-up, and after it
def test_a_resume_across_the_boundary_equals_the_straight_run(pt_data, upcycled, tmp_path, stop_after):
    run(pt_data, str(upcycled), tmp_path / "straight")
    run(pt_data, str(upcycled), tmp_path / "resumed", stop_after=stop_after)
    run(pt_data, str(upcycled), tmp_path / "resumed", resume="auto")
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("straight", "resumed")]
    assert [line.split('"tokens_per_s"')[0] for line in losses[0].splitlines()] == \
        [line.split('"tokens_per_s"')[0] for line in losses[1].splitlines()]


def test_a_dense_model_is_refused(pt_data, upcycled, tmp_path):
    with pytest.raises(DogeError, match="train.moe_warmup_steps needs a CDMoE model"):
        run(pt_data, str(upcycled.parent / "dense"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
