"""Hugging Face interop: doge -> transformers and transformers -> doge give the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from doge_cli.errors import DogeError
from doge_cli.model import load_model, save_pretrained

from .doge_twin import hf_twin, ours_from, rel_err, tiny_config

# Distinct tokens per row: no biases tie at the top-k cut, where transformers' torch.topk and doge's
# documented tie rule may keep different keys.
IDS = torch.stack([torch.randperm(125, generator=torch.Generator().manual_seed(5 + i))[:16] + 3 for i in range(2)])


@pytest.mark.parametrize("tied", [True, False])
def test_doge_save_loads_natively_in_transformers(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied, keep_window_size=8)
    ours = ours_from(hf_twin(config), "sdpa")
    out = save_pretrained(ours, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [".doge-output", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "doge"
    assert not list(tmp_path.glob(".model*"))  # no temporary folder left behind
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DogeForCausalLM"
    with torch.no_grad():
        assert rel_err(ours(IDS).logits, hf(IDS).logits) <= 1e-5
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_save_replaces_only_a_folder_doge_wrote(tmp_path):
    from doge_cli.errors import DogeError

    ours = ours_from(hf_twin(tiny_config()), "eager")
    save_pretrained(ours, tmp_path / "model")
    save_pretrained(ours, tmp_path / "model")  # an earlier doge save, holding only what doge wrote: replaced
    (tmp_path / "model" / "README.md").write_text("my edited card")  # ... but not with a file of the user's in it
    with pytest.raises(DogeError, match="holds README.md, which doge did not write there"):
        save_pretrained(ours, tmp_path / "model")
    assert (tmp_path / "model" / "README.md").read_text() == "my edited card"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(DogeError, match="did not write"):
        save_pretrained(ours, tmp_path / "theirs")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_save_loads_in_doge(tmp_path, tied):
    hf = hf_twin(tiny_config(tie_word_embeddings=tied, is_moe=True, num_experts=16, num_experts_per_tok=4))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", attn_implementation="eager")
    assert ours.config.is_moe
    with torch.no_grad():
        assert rel_err(ours(IDS).logits, hf(IDS).logits) <= 1e-5
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_load_model_casts_dtype(tmp_path):
    hf_twin(tiny_config()).save_pretrained(tmp_path / "hf")
    assert load_model(tmp_path / "hf", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_inputs_raise_one_line_doge_errors(tmp_path):
    with pytest.raises(DogeError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DogeError, match="no config.json"):
        load_model(tmp_path / "empty")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DogeError, match="not a Doge"):
        load_model(llama)
    hf_twin(tiny_config()).save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DogeError, match="corrupt"):
        load_model(tmp_path / "corrupt")


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DogeError, match="offline"):
        load_model("SmallDoge/no-such-model-for-tests")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    hf_twin(tiny_config()).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DogeError, match="do not fit"):
        load_model(tmp_path / "hf")
