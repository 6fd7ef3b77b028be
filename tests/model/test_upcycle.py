"""doge upcycle: the CDMoE model keeps every dense tensor, adds L·(2·E·H + 2·√E·H) parameters, computes the
dense logits exactly with --init zero, and loads in transformers with the same logits as doge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from doge_cli.errors import DogeError
from doge_cli.model.upcycle import added_parameters, check_experts, upcycle
from tests.chat.toymodel import make_chat_tokenizer
from tests.cli.helpers import run_doge


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    root = tmp_path_factory.mktemp("dense")
    tok = make_chat_tokenizer(root / "tok")
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        keep_window_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = DogeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.A.normal_()  # not the zero init: the attention bias matters
    return save_pretrained(model, root / "model", tokenizer=tok)


IDS = torch.tensor([[3, 9, 4, 17, 5, 2, 8, 11]])


def logits(folder, hf: bool = False):
    if hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    else:
        from doge_cli.model import load_model

        model = load_model(str(folder), attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_zero_init_computes_the_dense_function_exactly(dense, tmp_path):
    out = upcycle(str(dense), tmp_path / "moe", num_experts=64, experts_per_token=8)
    assert torch.equal(logits(out), logits(dense))
    config = json.loads((out / "config.json").read_text())
    assert config["is_moe"] is True and config["num_experts"] == 64 and config["num_experts_per_tok"] == 8
    assert config["router_aux_loss_coef"] == 0.001  # transformers' default, not the dense model's 0
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_every_dense_tensor_is_kept_and_the_count_grows_by_the_formula(dense, tmp_path):
    out = upcycle(str(dense), tmp_path / "moe", num_experts=16, experts_per_token=4, init="normal")
    before, after = load_file(str(dense / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    added = sum(v.numel() for k, v in after.items() if k not in before)
    h, layers, experts = 32, 2, 16
    assert added == layers * (2 * experts * h + 2 * 4 * h) == added_parameters(type("C", (), {
        "hidden_size": h, "num_hidden_layers": layers})(), experts)
    assert all(after[f"model.layers.{i}.mlp.up_embed.weight"].abs().sum() > 0 for i in range(layers))  # normal init
    assert not torch.equal(logits(out), logits(dense))  # near the dense function, not at it


def test_transformers_loads_it_with_the_same_logits_as_doge(dense, tmp_path, capsys):
    code, out, err = run_doge(capsys, "upcycle", str(dense), "--num-experts", "64", "--experts-per-token", "8",
                              "--init", "normal", "--out", str(tmp_path / "moe"))
    assert code == 0, err
    assert out.strip() == (f"upcycled {dense} into {tmp_path / 'moe'}: 2 layers x 64 experts, top 8, "
                           f"{2 * (2 * 64 * 32 + 2 * 8 * 32):,} parameters added, init normal, "
                           "router aux loss coefficient 0.001")
    assert torch.allclose(logits(tmp_path / "moe", hf=True), logits(tmp_path / "moe"), atol=1e-5, rtol=1e-5)


def test_counts_it_cannot_route_are_refused():
    with pytest.raises(DogeError, match="not a perfect square .*; use 16 or 25"):
        check_experts(20, 4)
    with pytest.raises(DogeError, match="must be between 1 and --num-experts"):
        check_experts(16, 17)
    assert check_experts(16384, 32) == 128


def test_the_router_loss_weight_is_set_and_checked(dense, tmp_path, capsys):
    out = upcycle(str(dense), tmp_path / "moe", num_experts=16, experts_per_token=4, router_aux_loss_coef=0.01)
    assert json.loads((out / "config.json").read_text())["router_aux_loss_coef"] == 0.01
    assert json.loads((out / "upcycling.json").read_text())["router_aux_loss_coef"] == 0.01
    code, _, err = run_doge(capsys, "upcycle", str(dense), "--num-experts", "16", "--experts-per-token", "4",
                            "--router-aux-loss-coef", "-1", "--out", str(tmp_path / "bad"))
    assert code == 2 and err.strip() == "doge: error: --router-aux-loss-coef must be a finite number >= 0, got -1.0"
    assert not (tmp_path / "bad").exists()


def test_an_moe_model_is_not_upcycled_again(dense, tmp_path):
    moe = upcycle(str(dense), tmp_path / "moe", num_experts=16, experts_per_token=4)
    with pytest.raises(DogeError, match="is already a CDMoE model"):
        upcycle(str(moe), tmp_path / "again", num_experts=16, experts_per_token=4)
    assert not (tmp_path / "again").exists()


def test_a_legacy_small_doge_checkpoint_is_refused(tmp_path):
    from tests.model.test_legacy import transformers_style_folder

    legacy = transformers_style_folder(tmp_path)
    with pytest.raises(DogeError, match="is an old small-doge checkpoint"):
        upcycle(str(legacy), tmp_path / "moe", num_experts=16, experts_per_token=4)
    assert not (tmp_path / "moe").exists()
