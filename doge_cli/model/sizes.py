"""Parameter counts and training FLOPs per token (for MFU) of a Doge config; ``size_config`` builds
the DogeConfig of a named size from the one size registry, ``doge_cli.config.presets.SIZES``."""

from __future__ import annotations

import math

from transformers import DogeConfig

from doge_cli.model.modeling import head_dim, is_legacy


def size_config(name: str, **overrides) -> DogeConfig:
    """A DogeConfig for a size preset of ``doge_cli.config.presets.SIZES`` ("20M" or "Doge-20M"; dense,
    ``router_aux_loss_coef`` 0, which TRL needs for dense Doge)."""
    from doge_cli.config.presets import SIZES, normalize_size

    key = normalize_size(name)
    if key is None:
        raise KeyError(f"unknown size {name!r}; sizes: {', '.join(SIZES)}")
    values = {**SIZES[key].model, "router_aux_loss_coef": 0.0, **overrides}
    return DogeConfig(**values)


def _layer_parameters(config: DogeConfig) -> tuple[int, int]:
    """(all parameters of one decoder layer, those a token actually multiplies with)."""
    h, i = config.hidden_size, config.intermediate_size
    d = head_dim(config)
    hq, hkv = config.num_attention_heads * d, config.num_key_value_heads * d
    b_attn, b_mlp = int(config.attention_bias), int(config.mlp_bias)
    attn = (h * hq + hq * b_attn) + 2 * (h * hkv + hkv * b_attn) + (hq * h + h * b_attn)
    legacy = is_legacy(config)  # old small-doge: bias per query head, no q/k norms
    bias_heads = config.num_attention_heads if legacy else config.num_key_value_heads
    attn += hkv * bias_heads + bias_heads * b_attn  # dt_proj
    attn += bias_heads + (0 if legacy else 2 * d)  # A, q_norm, k_norm
    mlp = 3 * h * i + b_mlp * (2 * i + h)
    total = attn + mlp + 4 * h  # two norms, two residual weight vectors
    active = total
    if config.is_moe:
        num_keys = math.floor(math.sqrt(config.num_experts))
        router, experts = h * 2 * num_keys, 2 * config.num_experts * h
        total += router + experts
        active += router + 2 * config.num_experts_per_tok * h
    return total, active


def count_parameters(config: DogeConfig) -> int:
    """Number of distinct parameters of ``DogeForCausalLM(config)`` (a tied head counts once)."""
    layer, _ = _layer_parameters(config)
    embed = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embed
    return embed + head + config.num_hidden_layers * layer + config.hidden_size


def training_flops_per_token(config: DogeConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token: ``6 * N + 12 * L * d_attn * T``.

    ``N`` counts the weights a token multiplies with: every layer weight (for CDMoE only the
    ``num_experts_per_tok`` routed experts) plus the LM head matrix, but not the embedding lookup
    (free) unless it is tied to the head. ``12 * L * d_attn * T`` is attention's ``QK^T`` and ``AV``
    (2 FLOPs per multiply-add, 2 products, x3 for forward + backward) over ``T`` keys with
    ``d_attn = heads * head_dim``, counted in full although causal masking skips half (the usual
    convention of Kaplan et al. 2020 and the PaLM paper's MFU, Chowdhery et al. 2022, App. B).
    """
    _, active = _layer_parameters(config)
    d = head_dim(config)
    n = config.num_hidden_layers * active + config.hidden_size + config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_hidden_layers * config.num_attention_heads * d * seq_len
