"""Dense → CDMoE upcycling: a dense Doge becomes a cross-domain mixture-of-experts Doge that starts from
the same function.

Every dense tensor is carried over unchanged; each layer's dense SwiGLU stays as the shared expert (the
CDMoE block computes ``shared(x) + routed(x)`` with the same ``gate_proj``/``up_proj``/``down_proj``
names), and three tensors are added per layer: the product-key router ``router_gate`` (2·√E x H) and the
single-neuron experts' ``down_embed`` and ``up_embed`` (E x H each), so the model grows by
``L·(2·E·H + 2·√E·H)`` parameters.

``init="zero"`` (the default) sets ``up_embed`` to zero: every expert's output is then zero, the routed
sum is exactly zero, and the upcycled model computes the dense model's logits exactly at step 0 (the
function-preserving choice, as LoRA's B = 0); the router and ``down_embed`` start as transformers
initialises them (normal(0, initializer_range)), so the gradient reaching ``up_embed`` is not zero.
``init="normal"`` draws ``up_embed`` from normal(0, initializer_range) too, as small-doge's upcycling
does; the model then starts near, not at, the dense function.

The result is a transformers Doge folder (``is_moe: true``) that loads with ``AutoModelForCausalLM``,
no remote code, with the dense folder's tokenizer and chat template, and ``upcycling.json`` recording
where it came from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from doge_cli.errors import DogeError

INITS = ("zero", "normal")
ROUTER_AUX_LOSS_COEF = 0.001  # transformers' DogeConfig default, which small-doge's MoE recipes use
NEW_TENSORS = ("mlp.router_gate.weight", "mlp.down_embed.weight", "mlp.up_embed.weight")


def check_experts(num_experts: int, experts_per_token: int) -> int:
    """The number of product keys (√E); one-line DogeError for counts CDMoE cannot route."""
    if num_experts < 4:
        raise DogeError(f"--num-experts {num_experts} is too small; use a perfect square of at least 4, e.g. 16384")
    keys = math.isqrt(num_experts)
    if keys * keys != num_experts:
        lower, upper = keys * keys, (keys + 1) ** 2
        raise DogeError(f"--num-experts {num_experts} is not a perfect square (product-key routing picks experts "
                        f"as pairs of √E keys); use {lower} or {upper}")
    if not 1 <= experts_per_token <= num_experts:
        raise DogeError(f"--experts-per-token {experts_per_token} must be between 1 and --num-experts ({num_experts})")
    return keys


def added_parameters(config, num_experts: int) -> int:
    """Parameters upcycling adds: L·(2·E·H + 2·√E·H)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    return layers * (2 * num_experts * h + 2 * math.isqrt(num_experts) * h)


def upcycle(dense: str, out: str | Path, *, num_experts: int, experts_per_token: int, init: str = "zero",
            seed: int = 0, router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF):
    """Write the CDMoE model upcycled from the dense model ``dense`` (folder or hub id) to ``out``.

    ``router_aux_loss_coef`` weights the router's load-balancing loss in continuation training; the
    default 0.001 is transformers' ``DogeConfig`` default, which small-doge's MoE recipes train with
    (a dense model's config carries 0)."""
    from transformers import AutoTokenizer, DogeConfig

    from doge_cli.io import check_apart, check_replaceable
    from doge_cli.model import DogeForCausalLM, load_model, save_pretrained
    from doge_cli.model.hub import _resolve

    if init not in INITS:
        raise DogeError(f"unknown --init {init!r}; choose zero (the dense function exactly) or normal")
    check_experts(num_experts, experts_per_token)
    if not (math.isfinite(router_aux_loss_coef) and router_aux_loss_coef >= 0):
        raise DogeError(f"--router-aux-loss-coef must be a finite number >= 0, got {router_aux_loss_coef}")
    check_apart(out, {"dense model": dense})
    check_replaceable(out, "--out")
    model = load_model(dense, attn_implementation="eager", dtype=torch.float32, allow_legacy=False)
    if model.config.is_moe:
        raise DogeError(f"{dense} is already a CDMoE model ({model.config.num_experts} experts); upcycle a dense one")
    fields = model.config.to_dict()
    fields.update(is_moe=True, num_experts=num_experts, num_experts_per_tok=experts_per_token,
                  router_aux_loss_coef=router_aux_loss_coef)
    for key in ("architectures", "transformers_version", "model_type"):
        fields.pop(key, None)
    config = DogeConfig(**fields)
    torch.manual_seed(seed)
    moe = DogeForCausalLM(config, attn_implementation="eager")  # router and experts as transformers inits them
    dense_state = model.state_dict()
    moe_state = moe.state_dict()
    missing = [k for k in dense_state if k not in moe_state]
    new = sorted(k for k in moe_state if k not in dense_state)
    expected_new = sorted(f"model.layers.{i}.{t}" for i in range(config.num_hidden_layers) for t in NEW_TENSORS)
    if missing or new != expected_new:  # pragma: no cover - the two layouts are one model class
        raise DogeError(f"internal: dense and CDMoE layouts differ beyond the expert tensors ({missing[:2]}, {new[:2]})")
    with torch.no_grad():
        for key, value in dense_state.items():
            moe_state[key].copy_(value)
        if init == "zero":
            for layer in moe.model.layers:
                layer.mlp.up_embed.weight.zero_()
    moe.tie_weights()
    tokenizer = None
    folder = _resolve(str(dense))
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    record = {"upcycled_from": str(dense), "num_experts": num_experts, "experts_per_token": experts_per_token,
              "init": init, "seed": seed, "router_aux_loss_coef": router_aux_loss_coef, "added_parameters": added_parameters(config, num_experts)}
    return save_pretrained(moe, out, tokenizer=tokenizer, extra_files={"upcycling.json": json.dumps(record, indent=2)})
