"""Dynamic-mask attention (Doge): one fused Triton kernel plus the PyTorch reference it must match.

scores[b, h, i, j] = q[b, h, i] . k[b, h // G, j] * scale + bias[b, h // G, j]   (G = Hq // Hkv)

restricted to the allowed keys of query i, which sits at key position Tk - Tq + i:
- causal: j <= Tk - Tq + i;
- packed documents: doc_ids[b, j] == doc_ids[b, Tk - Tq + i];
- padding: key_padding_mask[b, j] is True;
- keep window: when Tk > keep_window_size, only the keep_window_size allowed keys with the
  largest bias. This is the rule of transformers' ``DogeAttention.prepare_dynamic_mask`` (mask
  the bias, then ``topk`` over the keys of each (kv head, query) row), except for ties at the
  k-th value: transformers keeps whichever tied keys ``torch.topk`` happens to return (it differs
  by device), here the latest tied keys are kept (see :func:`keep_window_threshold`). Kernel and
  reference share that rule, so they agree exactly; without ties both equal transformers.

A query with no allowed key outputs zeros (transformers would spread it uniformly; zeros are
what a padded query should contribute and they cannot produce NaN gradients).

``dma_attention`` is the ``triton`` attention backend of ``doge_cli.model.attention``. It runs the
kernel, or, where ``doge_cli.kernels.unavailable_reason(q.device)`` gives a reason, refuses in one line:
it never falls back to the reference silently (``auto`` picks another backend instead).
"""


import torch

from doge_cli.errors import DogeError
from doge_cli.kernels import unavailable_reason

__all__ = ["dma_attention", "dma_attention_reference", "keep_window_mask", "keep_window_threshold"]

# Bytes of fp32 scores the top-k pre-pass may hold at once; it works through queries in chunks.
_THRESHOLD_CHUNK_BYTES = 256 * 1024 * 1024


def _check_inputs(q, k, v, bias, doc_ids, key_padding_mask, keep_window_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise DogeError(f"dma_attention expects q, k, v of shape (B, H, T, D); got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise DogeError(f"k and v must be (B, Hkv, Tk, D) matching q's batch and head dim; got q "
                        f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise DogeError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Tq > Tk:
        raise DogeError(f"more queries ({Tq}) than keys ({Tk}): queries must be the last Tq key positions")
    if tuple(bias.shape) != (B, Hkv, Tk):
        raise DogeError(f"bias must be (batch, kv_heads, keys) = {(B, Hkv, Tk)}, got {tuple(bias.shape)}")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, Tk):
        raise DogeError(f"doc_ids must be (batch, keys) = {(B, Tk)}, got {tuple(doc_ids.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Tk) or key_padding_mask.dtype != torch.bool:
            raise DogeError(f"key_padding_mask must be a bool tensor of shape {(B, Tk)} (True = real "
                            f"token), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if keep_window_size is not None and keep_window_size < 1:
        raise DogeError(f"keep_window_size must be a positive number of keys or None, got {keep_window_size}")


def _allowed_mask(B, Tq, Tk, device, doc_ids, key_padding_mask, q_start=0, q_end=None) -> torch.Tensor:
    """(B, 1, q_end - q_start, Tk) bool: causal, document and padding constraints, without top-k."""
    q_end = Tq if q_end is None else q_end
    q_pos = torch.arange(q_start, q_end, device=device) + (Tk - Tq)
    k_pos = torch.arange(Tk, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(B, 1, -1, -1)
    if doc_ids is not None:
        q_doc = doc_ids[:, q_pos]
        allowed = allowed & (q_doc[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


@torch.no_grad()
def keep_window_threshold(bias, Tq, keep_window_size, doc_ids=None, key_padding_mask=None) -> torch.Tensor:
    """Which keys each query keeps under the top-``keep_window_size`` rule, as (threshold, cut).

    Returns (B, Hkv, Tq, 2) fp32. ``[..., 0]`` is the k-th largest bias among the keys the query
    may attend (-inf when it may attend fewer than k, so every allowed key is kept); ``[..., 1]``
    is a key position. An allowed key j is kept iff ``bias_j > threshold`` or
    ``bias_j == threshold and j >= cut``: keys tied at the threshold are taken latest first, so
    exactly k keys are kept. Ties are common in Doge, not a corner case: the bias depends only on
    the value vector, so repeated tokens tie, and at initialisation (A = 0) every bias is 1 and
    this rule becomes a sliding window of the k most recent keys. (transformers breaks ties by
    whatever order ``torch.topk`` returns, which differs by device.) Not differentiable: the
    selection carries no gradient, as in transformers.
    """
    B, Hkv, Tk = bias.shape
    bias32 = bias.float()
    # Peak is a few (B, Hkv, rows, Tk) tensors of 4-8 bytes; work through the queries in chunks.
    rows = max(1, _THRESHOLD_CHUNK_BYTES // max(1, 16 * B * Hkv * Tk))
    out = torch.empty((B, Hkv, Tq, 2), dtype=torch.float32, device=bias.device)
    positions = torch.arange(Tk, device=bias.device, dtype=torch.float32)
    for start in range(0, Tq, rows):
        end = min(start + rows, Tq)
        allowed = _allowed_mask(B, Tq, Tk, bias.device, doc_ids, key_padding_mask, start, end)
        masked = torch.where(allowed, bias32[:, :, None, :], float("-inf"))
        thr = masked.topk(keep_window_size, dim=-1).values[..., -1:]
        ties_wanted = keep_window_size - (masked > thr).sum(-1, keepdim=True)
        tied = (masked == thr) & allowed
        ties_from_right = tied.flip(-1).cumsum(-1).flip(-1)
        kept_tie = tied & (ties_from_right <= ties_wanted)
        cut = torch.where(kept_tie, positions, float(Tk)).amin(-1, keepdim=True)
        out[:, :, start:end] = torch.cat((thr, cut), dim=-1)
    return out


def keep_window_mask(window: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, Tq, Tk) bool: keys kept by the (threshold, cut) of :func:`keep_window_threshold`."""
    b = bias.detach().float()[:, :, None, :]
    thr, cut = window[..., 0:1], window[..., 1:2]
    positions = torch.arange(bias.shape[-1], device=bias.device, dtype=torch.float32)
    return (b > thr) | ((b == thr) & (positions >= cut))


def dma_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    keep_window_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch dynamic-mask attention, same contract as ``dma_attention``.

    Materialises the (B, Hq, Tq, Tk) scores in fp32 (fp64 if the inputs are fp64); meant for
    tests and as the fallback where the kernel cannot run.
    """
    _check_inputs(q, k, v, bias, doc_ids, key_padding_mask, keep_window_size)
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = _allowed_mask(B, Tq, Tk, q.device, doc_ids, key_padding_mask)  # (B, 1, Tq, Tk)
    allowed = allowed.expand(B, Hkv, Tq, Tk)
    if keep_window_size is not None and Tk > keep_window_size:
        window = keep_window_threshold(bias, Tq, keep_window_size, doc_ids, key_padding_mask)
        allowed = allowed & keep_window_mask(window, bias)
    kk = k.to(acc).repeat_interleave(group, dim=1)
    vv = v.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ kk.transpose(-1, -2)) * scale + bias.to(acc).repeat_interleave(group, dim=1)[:, :, None, :]
    allowed = allowed.repeat_interleave(group, dim=1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: softmax of all -inf is NaN; give them zeros instead.
    has_any = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_any, 0.0), dim=-1) * has_any
    return (probs @ vv).to(q.dtype)


# ---- custom ops: the kernel behind torch.library so torch.compile can trace around it -------------


def _kernels():
    from doge_cli.kernels import _dma_triton

    return _dma_triton


@torch.library.custom_op("doge::dma_attention_fwd", mutates_args=())
def _dma_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().forward(q, k, v, bias, threshold, doc_ids, key_padding_mask, scale)


@_dma_fwd.register_fake
def _(q, k, v, bias, threshold, doc_ids, key_padding_mask, scale):
    B, Hq, Tq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Tq), dtype=torch.float32)


@torch.library.custom_op("doge::dma_attention_bwd", mutates_args=())
def _dma_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    threshold: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(grad_out, q, k, v, bias, out, lse, threshold, doc_ids, key_padding_mask, scale)


@_dma_bwd.register_fake
def _(grad_out, q, k, v, bias, out, lse, threshold, doc_ids, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, threshold, doc_ids, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, threshold, doc_ids, key_padding_mask)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias, out, lse, threshold, doc_ids, key_padding_mask = ctx.saved_tensors
    dq, dk, dv, dbias = _dma_bwd(grad_out.contiguous(), q, k, v, bias, out, lse, threshold, doc_ids,
                                 key_padding_mask, ctx.scale)
    return dq, dk, dv, dbias, None, None, None, None


torch.library.register_autograd("doge::dma_attention_fwd", _backward, setup_context=_setup_context)


def dma_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float,
    doc_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    keep_window_size: int | None = None,
) -> torch.Tensor:
    """Fused dynamic-mask attention (FlashAttention-2 style Triton kernel, forward and backward).

    Args:
        q: (B, Hq, Tq, D) queries; the last Tq of the Tk key positions (Tq < Tk when decoding).
        k, v: (B, Hkv, Tk, D) with Hq % Hkv == 0 (GQA: query head h reads kv head h // (Hq // Hkv)).
        bias: (B, Hkv, Tk) dynamic-mask bias added to every query's score for that key.
        scale: multiplier of q . k (usually D ** -0.5).
        doc_ids: (B, Tk) integer document ids of packed rows; a query sees only its own document.
        key_padding_mask: (B, Tk) bool, True for real tokens.
        keep_window_size: when Tk exceeds it, each query keeps only that many allowed keys with
            the largest bias (see the module docstring for ties).

    Returns:
        (B, Hq, Tq, D) in q's dtype, differentiable in q, k, v and bias. fp16/bf16 inputs are
        computed with fp32 accumulation.
    """
    _check_inputs(q, k, v, bias, doc_ids, key_padding_mask, keep_window_size)
    reason = unavailable_reason(q.device)
    if reason is not None:  # never a silent switch to the (slow, memory-hungry) reference
        raise DogeError(f"the triton attention backend cannot run on {q.device}: {reason}; use "
                        "runtime.attn_implementation=sdpa, or auto (which picks a backend that runs)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DogeError(f"the triton attention backend takes fp32, bf16 or fp16 tensors, not {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DogeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Tq, Tk = q.shape[2], k.shape[2]
    threshold = None
    if keep_window_size is not None and Tk > keep_window_size:
        threshold = keep_window_threshold(bias, Tq, keep_window_size, doc_ids, key_padding_mask)
    out, _ = _dma_fwd(q, k, v, bias, threshold, doc_ids, key_padding_mask, float(scale))
    return out


def attention_flops(B: int, Hq: int, Tq: int, Tk: int, D: int, causal: bool = True) -> float:
    """Matmul FLOPs of one attention forward (2 products of 2*Tq*Tk*D), halved when causal.

    The usual convention of FlashAttention benchmarks; backward is counted as 2.5x forward.
    """
    flops = 4.0 * B * Hq * Tq * Tk * D
    if causal:
        flops *= (Tk - Tq + (Tq + 1) / 2) / Tk if Tq < Tk else 0.5
    return flops


