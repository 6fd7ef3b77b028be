"""Old small-doge checkpoints: both layouts load with their own math, checked against transformers.

The oracle is transformers' own DogeForCausalLM turned into the old math: multi-head (Hkv = Hq) so
``A`` / ``dt_proj`` are per query head, q/k norms replaced by identities, and the old k/v/dt_proj
weights expanded so each query head reads a copy of its kv head.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DogeConfig
from transformers import DogeForCausalLM as HFDoge

from doge_cli.errors import DogeError
from doge_cli.inference import generate
from doge_cli.model import DogeForCausalLM, count_parameters, load_model, save_pretrained
from doge_cli.model.hub import LEGACY_KEY_MAP, legacy_layout

from .doge_twin import BACKENDS, rel_err, skip_unavailable

HQ, HKV, D = 4, 2, 16
SHAPE = dict(vocab_size=128, hidden_size=HQ * D, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
             rope_theta=10000.0)
# The inverse of doge's key map: the names small-doge's first modeling code wrote.
OLD_NAMES = [(".input_layernorm.", ".pre_layernorm."), (".input_residual", ".pre_residual.weight"),
             (".post_attention_layernorm.", ".post_layernorm."),
             (".post_attention_residual", ".post_residual.weight"), (".mlp.", ".feed_forward."),
             ("model.embed_tokens.", "model.word_embed."), ("model.norm.", "model.final_layernorm.")]


def _legacy_weights(keep_window_size: int = 2048, seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Random old-math weights in transformers-style names: A and dt_proj per query head, no q/k norms."""
    torch.manual_seed(seed)
    config = DogeConfig(**(SHAPE | shape), keep_window_size=keep_window_size, small_doge_legacy=True)
    model = DogeForCausalLM(config)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith((".A", "dt_proj.weight")):
            p = torch.randn_like(p)  # std 1 so the bias differs between keys and heads
        elif name.endswith(("residual", "norm.weight", "layernorm.weight")):
            p = 1.0 + 0.3 * torch.randn_like(p)
        state[name] = p.clone()
    assert state["model.layers.0.self_attn.A"].shape == (HQ,)
    assert state["model.layers.0.self_attn.dt_proj.weight"].shape == (HQ, HKV * D)
    assert not any("q_norm" in k or "k_norm" in k for k in state)
    return state


def _write(folder, config: dict, state: dict[str, torch.Tensor]):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def transformers_style_folder(tmp_path, keep_window_size=2048, name="new", **shape):
    """small-doge's later layout: native names, no q/k norms, keep_window_size in the config."""
    config = dict(SHAPE | shape, model_type="doge", keep_window_size=keep_window_size,
                  architectures=["DogeForCausalLM"], auto_map={"AutoConfig": "configuration_doge.DogeConfig"})
    return _write(tmp_path / name, config, _legacy_weights(keep_window_size, **shape))


def march_2025_folder(tmp_path, name="old", **config_extra):
    """small-doge's first layout: word_embed / pre_layernorm / feed_forward names, no keep window."""
    state = {}
    for key, value in _legacy_weights().items():
        for new, old in OLD_NAMES:
            key = key.replace(new, old)
        state[key] = value
    state["model.rotary_emb.original_inv_freq"] = torch.ones(D // 2)  # a saved buffer some versions had
    config = dict(SHAPE, model_type="doge", hidden_bias=False, dynamic_mask_ratio=0.0, rope_scaling=None)
    config.update(config_extra)
    return _write(tmp_path / name, config, state)


def oracle(keep_window_size: int, attn: str = "eager", seed: int = 0) -> HFDoge:
    """transformers' Doge computing the old math with the same weights (see the module docstring)."""
    groups = HQ // HKV
    hf = HFDoge(DogeConfig(**dict(SHAPE, num_key_value_heads=HQ), keep_window_size=keep_window_size)).eval()
    hf.set_attn_implementation(attn)
    for layer in hf.model.layers:
        layer.self_attn.q_norm, layer.self_attn.k_norm = nn.Identity(), nn.Identity()
    state = {}
    for name, p in _legacy_weights(keep_window_size, seed).items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            p = p.view(HKV, D, -1).repeat_interleave(groups, dim=0).reshape(HQ * D, -1)
        elif name.endswith("dt_proj.weight"):
            # dt_proj read the HKV kv heads; the oracle's v holds each kv head `groups` times, so the
            # columns of kv head j sit at the first of its copies and the others are zero.
            wide = torch.zeros(HQ, HQ * D)
            for j in range(HKV):
                wide[:, j * groups * D:(j * groups + 1) * D] = p[:, j * D:(j + 1) * D]
            p = wide
        state[name] = p
    hf.load_state_dict(state, strict=True)
    return hf


def _ids(t=24, rows=3):
    """No token twice in a row: repeated tokens tie in layer 0's bias, and the Triton kernel breaks top-k
    ties differently from torch.topk (a known, documented difference; see tests/model/test_modeling.py)."""
    gen = torch.Generator().manual_seed(3)
    return torch.stack([torch.randperm(125, generator=gen)[:t] + 3 for _ in range(rows)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_style_layout_matches_oracle_with_top_k_and_padding(tmp_path, backend):
    skip_unavailable(backend)
    ours = load_model(transformers_style_folder(tmp_path, keep_window_size=8), attn_implementation=backend)
    assert ours.config.small_doge_legacy
    ref = oracle(keep_window_size=8)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -6:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()  # pad positions see no key: our output is zeros by contract, transformers' arbitrary
    assert rel_err(got[real], expected[real]) < 1e-5
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) < 1e-5


def test_march_2025_layout_matches_oracle_and_has_no_keep_window(tmp_path):
    folder = march_2025_folder(tmp_path)
    ours = load_model(folder, attn_implementation="sdpa")
    ids = _ids(t=40)
    # No keep window in that version: 40 keys > 8 would be cut by a window of 8, and must not be.
    with torch.no_grad():
        assert rel_err(ours(ids).logits, oracle(keep_window_size=10**6)(ids).logits) < 1e-5
        assert rel_err(ours(ids).logits, oracle(keep_window_size=8)(ids).logits) > 1e-3


def test_gradients_match_oracle(tmp_path):
    ours = load_model(transformers_style_folder(tmp_path), attn_implementation="sdpa").train()
    ref = oracle(keep_window_size=2048).train()
    ids = _ids()
    ours(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.A",
                 "model.layers.0.input_residual", "model.layers.1.mlp.down_proj.weight"):
        got = dict(ours.named_parameters())[name].grad
        assert rel_err(got, ref_grads[name].grad) < 1e-4, name


def test_greedy_generation_with_cache_matches_oracle_generate(tmp_path):
    ours = load_model(transformers_style_folder(tmp_path, keep_window_size=12), attn_implementation="sdpa")
    ref = oracle(keep_window_size=12)
    ref.generation_config.eos_token_id = None
    prompt = _ids(t=6, rows=1)
    out = generate(ours, prompt, max_new_tokens=24)
    assert torch.equal(out.sequences, ref.generate(prompt, max_new_tokens=24, do_sample=False))


def test_layouts_are_told_apart_by_their_keys(tmp_path):
    from safetensors.torch import load_file

    old = load_file(march_2025_folder(tmp_path) / "model.safetensors")
    new = load_file(transformers_style_folder(tmp_path) / "model.safetensors")
    native = DogeForCausalLM(DogeConfig(**SHAPE)).state_dict()
    assert legacy_layout(old) == "2024-25 names"
    assert legacy_layout(new) == "transformers-style names without q/k norms"
    assert legacy_layout(native) is None
    # Every old name is renamed by the documented map (nothing old survives the rename).
    import re

    renamed = set()
    for key in old:
        for pattern, replacement in LEGACY_KEY_MAP.items():
            key = re.sub(pattern, replacement, key)
        renamed.add(key)
    assert renamed - {"model.rotary_emb.original_inv_freq"} == set(new)


def test_parameter_count_counts_the_old_shapes(tmp_path):
    model = load_model(transformers_style_folder(tmp_path))
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())


def test_legacy_model_is_never_saved_or_trained_from(tmp_path):
    folder = transformers_style_folder(tmp_path)
    model = load_model(folder)
    with pytest.raises(DogeError, match="cannot express"):
        save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(DogeError, match="not train from it"):
        load_model(folder, allow_legacy=False)


def test_training_from_a_legacy_checkpoint_is_refused_before_any_work(tmp_path):
    from doge_cli.config import resolve_config
    from doge_cli.train.objectives import objective_for

    folder = transformers_style_folder(tmp_path)
    for stage in ("pt", "dpo"):
        cfg = resolve_config(stage, hardware="cpu", size="1M",
                             overrides=[f"init_from={folder}", f"output_dir={tmp_path / stage}"])
        obj = objective_for(cfg)
        obj.tokenizer = _VocabOnly()
        with pytest.raises(DogeError, match="old small-doge checkpoint"):
            obj.build_model()


class _VocabOnly:
    """The one tokenizer property build_model reads before loading the start model."""

    def __len__(self):
        return 128


@pytest.mark.parametrize(("extra", "state_extra", "match"), [
    (dict(dynamic_mask_ratio=0.5), {}, "dynamic_mask_ratio"),
    ({}, {"model.layers.0.feed_forward.queries.weight": torch.zeros(4, 4)}, "product-key"),
])
def test_unsupported_old_variants_are_refused_in_one_line(tmp_path, extra, state_extra, match):
    folder = march_2025_folder(tmp_path, **extra)
    if state_extra:
        from safetensors.torch import load_file

        state = load_file(folder / "model.safetensors") | state_extra
        save_file(state, folder / "model.safetensors")
    with pytest.raises(DogeError, match=match) as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_doge_chat_answers_from_an_old_checkpoint(tmp_path, capsys):
    from ..chat.toymodel import make_chat_tokenizer
    from ..cli.helpers import run_doge

    tok = make_chat_tokenizer(tmp_path / "tok")
    folder = transformers_style_folder(tmp_path, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(folder)
    code, out, err = run_doge(capsys, "chat", str(folder), "--prompt", "hello", "--greedy", "--max-new-tokens", "6")
    assert code == 0, err
    assert out.strip()
