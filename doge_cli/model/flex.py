"""The ``flex`` attention backend: torch flex_attention with the Doge bias as a score_mod.

The block mask carries causal + document + padding masking; the model builds it once per batch
and every layer reuses it. The per-layer part lives in the score_mod: the bias, and past
``keep_window_size`` keys the top-k cut. The cut is a dense (B, Hkv, Tq, Tk) bool built by the
shared tie rule of ``doge_cli.model.attention`` (ties at the cut kept latest first), so flex keeps
exactly the keys every other backend keeps.

torch 2.13 on CPU runs flex_attention only uncompiled (a dense reference implementation; the
compiled CPU kernel is inference-only and returns no logsumexp) and refuses its backward. So on
CPU the forward runs flex_attention without autograd and :class:`_FlexBackwardCPU` computes the
gradients as FlashAttention's backward does (Dao et al. 2022, Alg. 2).
The backward recomputes the probabilities (dense, chunk-free, like the eager backend; CPU flex
is the readable parity path, not a fast one). On CUDA flex_attention is compiled once and
differentiates itself.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

from doge_cli.model.attention import allowed_keys, top_keys


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_attention, dynamic=False)


def _flex_fn(device: torch.device):
    return _compiled_flex() if device.type == "cuda" else _flex_attention


def build_block_mask(batch: int, q_len: int, k_len: int, doc_ids, key_padding_mask, device):
    """Block mask for causal attention of the last ``q_len`` positions, within documents, on real keys."""
    offset = k_len - q_len

    def mask_mod(b, h, q, kv):
        allowed = kv <= q + offset
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q + offset] == doc_ids[b, kv])
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[b, kv]
        return allowed

    device = torch.device(device)
    return create_block_mask(mask_mod, batch, None, q_len, k_len, device=device,
                             _compile=device.type == "cuda")


def _score_mod(bias: torch.Tensor, keep: torch.Tensor | None, groups: int):
    def score_mod(score, b, h, q, kv):
        score = score + bias[b, h // groups, kv]
        if keep is not None:
            score = torch.where(keep[b, h // groups, q, kv], score, -float("inf"))
        return score

    return score_mod


def flex_attention(q, k, v, bias, *, scale, doc_ids=None, key_padding_mask=None, keep_window_size=None,
                   block_mask=None):
    """Backend entry point; the signature is the shared one of ``doge_cli.model.attention``."""
    b, hq, q_len, _ = q.shape
    k_len, groups = k.shape[2], hq // k.shape[1]
    if block_mask is None:
        block_mask = build_block_mask(b, q_len, k_len, doc_ids, key_padding_mask, q.device)
    keep = None
    if keep_window_size is not None and k_len > keep_window_size:
        allowed = allowed_keys(q_len, k_len, doc_ids, key_padding_mask, q.device)
        keep = top_keys(bias.detach(), allowed, q_len, doc_ids, key_padding_mask, keep_window_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    if q.device.type == "cpu" and needs_grad:
        return _FlexBackwardCPU.apply(q, k, v, bias, scale, block_mask, keep, doc_ids, key_padding_mask)
    out = _flex_fn(q.device)(q, k, v, score_mod=_score_mod(bias, keep, groups), block_mask=block_mask,
                             scale=scale, enable_gqa=groups > 1)
    return out.to(q.dtype)


class _FlexBackwardCPU(torch.autograd.Function):
    """Forward by flex_attention; backward recomputes the probabilities (dense) and applies Alg. 2."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, block_mask, keep, doc_ids, key_padding_mask):
        groups = q.shape[1] // k.shape[1]
        # flex_attention refuses CPU inputs that require grad, even with autograd off here.
        q, k, v, bias = q.detach(), k.detach(), v.detach(), bias.detach()
        out = _flex_attention(q, k, v, score_mod=_score_mod(bias, keep, groups), block_mask=block_mask,
                              scale=scale, enable_gqa=groups > 1).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, keep, doc_ids, key_padding_mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, keep, doc_ids, key_padding_mask = ctx.saved_tensors
        b, hq, q_len, d = q.shape
        hkv, k_len = k.shape[1], k.shape[2]
        g = hq // hkv
        mask = allowed_keys(q_len, k_len, doc_ids, key_padding_mask, q.device)  # (B|1, 1, Tq, Tk)
        if keep is not None:
            mask = mask & keep
        mask = mask[:, :, None]  # broadcast over the query heads of each kv head
        qg = q.reshape(b, hkv, g, q_len, d).float()
        kf, vf = k.float()[:, :, None], v.float()[:, :, None]
        scores = torch.matmul(qg, kf.transpose(-1, -2)) * ctx.scale + bias.float()[:, :, None, None, :]
        # Probabilities are recomputed with softmax rather than exp(S - lse) from flex's saved logsumexp:
        # flex works in base 2, and its lse is off by an ulp or so, which the nearly cancelling
        # gradient of A amplifies past 1e-4.
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
        dout = grad_out.reshape(b, hkv, g, q_len, d).float()
        dv = torch.matmul(probs.transpose(-1, -2), dout).sum(2)
        dprobs = torch.matmul(dout, vf.transpose(-1, -2))
        # rowsum(P * dP) rather than FlashAttention's rowsum(dO * O): equal in exact arithmetic, but this
        # is softmax's own backward, which keeps the nearly cancelling gradient of A close to autograd's.
        delta = (probs * dprobs).sum(-1, keepdim=True)
        dscores = probs * (dprobs - delta)
        dq = torch.matmul(dscores, kf).reshape(b, hq, q_len, d) * ctx.scale
        dk = torch.matmul(dscores.transpose(-1, -2), qg).sum(2) * ctx.scale
        dbias = dscores.sum(dim=(2, 3))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias.to(bias.dtype),
                None, None, None, None, None)
