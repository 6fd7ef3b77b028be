"""Weight-only int8 for inference on the CPU (``--quantize int8`` of ``doge chat``, ``doge serve``, ``doge eval``).

Decoding one token reads every weight once, so on a CPU its time is bounded by the bytes read; int8 weights
are a quarter of fp32's bytes. Each linear layer of the decoder blocks and the LM head keeps its weight
as int8 with one scale per output channel (symmetric, ``scale = max|w| / 127`` of that row) and multiplies
through ``torch.ops.aten._weight_int8pack_mm``, torch's CPU kernel for exactly this (activations in bf16,
the weight dequantized on the fly). What stays in its own dtype:

- the token embedding (a lookup reads one row a token) — with tied embeddings the head gets its own int8
  copy, so the two are no longer shared (inference only);
- the dynamic-mask projection ``dt_proj`` and the norms (small, and they steer attention: kept exact);
- a CDMoE layer's router and expert embeddings (its experts are embeddings, not linear layers);
- any linear layer whose input width is not a multiple of 32 (the kernel's constraint), said once.

Measured quality and speed are in benchmarks/RESULTS.md ("CPU inference at the limit").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)
GROUP = 32  # the kernel reads the input in blocks: widths that are not a multiple of it give wrong results


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (``qweight``, out x in) and per-output-channel bf16 ``scales``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # The scales are bf16 (the kernel's), rounded before the weights are divided by them, so each weight is
        # off by at most half a step of its row.
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight = torch.round(weight / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * scales).T + bias`` in bf16 through the CPU kernel; the result in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm(flat, qweight, scales).view(*x.shape[:-1], qweight.shape[0])
    out = out.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def quantize_int8(model) -> dict[str, int]:
    """Replace the model's decoder-block linear layers and LM head by :class:`Int8Linear`, in place (CPU only).

    Returns ``{"quantized": n, "kept": m}`` (layers left in float because of their width)."""
    if model.device.type != "cpu":
        raise ValueError("int8 weights run on the CPU only (torch's _weight_int8pack_mm kernel)")
    counts = {"quantized": 0, "kept": 0}
    targets = [(layer, name) for layer in model.model.layers for name in _linear_names(layer)]
    targets.append((model, "lm_head"))
    for parent, name in targets:
        owner, attr = _owner(parent, name)
        linear = getattr(owner, attr)
        if linear.in_features % GROUP:
            counts["kept"] += 1
            continue
        setattr(owner, attr, Int8Linear(linear))
        counts["quantized"] += 1
    if counts["kept"]:
        logger.warning("--quantize int8: %d linear layers keep their float weights (input width not a multiple "
                       "of %d)", counts["kept"], GROUP)
    model.quantized = "int8"
    return counts


def _linear_names(layer) -> list[str]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    mlp = layer.mlp
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return names


def _owner(parent, dotted: str):
    *path, attr = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    return parent, attr
