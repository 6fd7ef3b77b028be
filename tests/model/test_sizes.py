"""Parameter counts of the size presets and the FLOPs-per-token formula."""

from __future__ import annotations

import pytest
import torch
from transformers import DogeForCausalLM as HFDoge

from doge_cli.model import DogeForCausalLM, count_parameters, training_flops_per_token
from doge_cli.model.sizes import size_config

from .doge_twin import tiny_config

# The SmallDoge guide's table, in millions. It truncates (54.57M is listed as 54M, 335.75M as 335M).
TABLE = {"Doge-20M": 13, "Doge-60M": 54, "Doge-160M": 152, "Doge-320M": 335}


def _built(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(TABLE))
def test_size_presets_match_the_table_and_both_models(name):
    config = size_config(name)
    n = count_parameters(config)
    assert n // 1_000_000 == TABLE[name]
    assert n == _built(DogeForCausalLM, config)
    assert n == _built(HFDoge, config)


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
                                       dict(is_moe=True, num_experts=64, num_experts_per_tok=8)])
def test_count_parameters_other_options(overrides):
    config = tiny_config(**overrides)
    assert count_parameters(config) == _built(HFDoge, config)


def test_training_flops_per_token_doge_20m():
    config = size_config("Doge-20M")
    n = count_parameters(config)
    # Tied head: every parameter takes part in a matmul; attention adds 12 * L * d * T.
    assert training_flops_per_token(config, 2048) == 6 * n + 12 * 8 * 256 * 2048
    assert round(training_flops_per_token(config, 2048) / 1e6) == 129  # FACTS.md: ~129 MFLOP


def test_training_flops_counts_only_active_experts():
    dense = tiny_config()
    moe = tiny_config(is_moe=True, num_experts=64, num_experts_per_tok=8)
    extra = training_flops_per_token(moe, 16) - training_flops_per_token(dense, 16)
    layers, hidden, keys = 2, 64, 8
    assert extra == 6 * layers * (hidden * 2 * keys + 2 * 8 * hidden)
