"""Helpers shared by the model tests: tiny configs and a transformers twin with the same weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DogeConfig  # noqa: E402
from transformers import DogeForCausalLM as HFDoge  # noqa: E402


def tiny_config(**overrides) -> DogeConfig:
    """hidden 64, 2 layers, vocab 128, GQA 4/2 heads; overrides win."""
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, keep_window_size=2048,
                  max_position_embeddings=256, router_aux_loss_coef=0.0, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return DogeConfig(**values)


def hf_twin(config: DogeConfig, seed: int = 0, attn: str = "eager") -> HFDoge:
    """transformers' Doge with random weights; A, dt_proj, norms and residual weights random too so they matter."""
    torch.manual_seed(seed)
    model = HFDoge(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.copy_(torch.randn_like(p))
            elif name.endswith("dt_proj.weight"):
                # With the default std 0.02, dt is nearly the same for every key, so the bias is nearly
                # a per-row constant that softmax ignores; std 1 makes the bias differ between keys.
                p.copy_(torch.randn_like(p))
            elif name.endswith("residual"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def ours_from(hf: HFDoge, backend: str):
    from doge_cli.model import DogeForCausalLM

    model = DogeForCausalLM(hf.config, attn_implementation=backend).eval()
    missing = model.load_state_dict(hf.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: b is the oracle."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


BACKENDS = ["eager", "sdpa", "flex", "triton"]


def skip_unavailable(backend: str) -> None:
    """The triton backend runs the real kernel under triton's interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1 for the whole suite, whichever folder is run); skip only without triton."""
    if backend == "triton":
        from doge_cli.kernels import _triton_importable, unavailable_reason

        if not _triton_importable():
            pytest.skip("the triton package is not installed here")
        assert unavailable_reason("cpu") is None, unavailable_reason("cpu")
