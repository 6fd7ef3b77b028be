"""Dynamic mask attention backends behind one dispatch point.

Every backend has the same signature (a fixed contract: the Triton kernel in
``doge_cli.kernels.dma_attention`` implements it too)::

    fn(q, k, v, bias, *, scale, doc_ids, key_padding_mask, keep_window_size) -> out

- ``q`` (B, Hq, Tq, D); ``k``, ``v`` (B, Hkv, Tk, D) with ``Hq % Hkv == 0``; query head ``h`` reads
  kv head ``h // (Hq // Hkv)`` (grouped-query attention, as transformers' ``repeat_kv``).
- ``bias`` (B, Hkv, Tk): the dynamic-mask bias ``exp(A * softplus(dt_proj(v)))`` of each key, added to
  the scaled scores ``q·k * scale``. It travels per key, never as a dense (B, H, Tq, Tk) mask.
- Causal always; the queries are the LAST ``Tq`` of the ``Tk`` positions (KV-cache decoding).
- ``doc_ids`` (B, Tk) or None: a query attends only to keys of its own document (packed rows).
- ``key_padding_mask`` (B, Tk) bool or None: True marks a real token.
- ``keep_window_size``: when ``Tk > keep_window_size`` each query keeps only its ``keep_window_size``
  allowed keys with the largest bias (Doge's dynamic mask, Shi et al. 2024, "Trainable Dynamic Mask
  Sparse Attention"). **Tie rule** (one rule for every backend): keys tied at the k-th largest bias are
  kept latest first, so exactly ``keep_window_size`` keys survive (see
  ``doge_cli.kernels.dma_attention.keep_window_threshold``). Ties are common, not a corner case: the bias
  is a function of the value vector, so repeated tokens tie in the first layer, and at initialisation
  (A = 0) every bias is 1 and the rule becomes a sliding window of the most recent keys. transformers
  breaks ties by whatever order ``torch.topk`` returns (it differs between CPU and CUDA); without ties
  every backend selects exactly the keys transformers selects.
- Returns (B, Hq, Tq, D) in q's dtype; a query with no allowed key returns zeros, not NaN.

Backends: ``eager`` (the readable reference), ``sdpa``, ``flex``, ``triton``; ``auto`` picks one.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from doge_cli.errors import DogeError

BACKENDS = ("eager", "sdpa", "flex", "triton")
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- masks shared by backends


def allowed_keys(
    q_len: int, k_len: int, doc_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None, device
) -> torch.Tensor:
    """Bool (B or 1, 1, Tq, Tk): causal, same document, real key. Queries are the last Tq positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, k_len - q_len :, None] == doc_ids[:, None, :]
        allowed = allowed & same_doc[:, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    return allowed


def top_keys(bias: torch.Tensor, allowed: torch.Tensor, q_len: int, doc_ids: torch.Tensor | None,
             key_padding_mask: torch.Tensor | None, keep_window_size: int) -> torch.Tensor:
    """Bool (B, Hkv, Tq, Tk): of the ``allowed`` keys, the ``keep_window_size`` with the largest bias per
    query, ties kept latest first (the module's tie rule, shared with the Triton kernel)."""
    from doge_cli.kernels.dma_attention import keep_window_mask, keep_window_threshold

    window = keep_window_threshold(bias, q_len, keep_window_size, doc_ids, key_padding_mask)
    return keep_window_mask(window, bias) & allowed


def _final_mask(bias, q_len, doc_ids, key_padding_mask, keep_window_size) -> torch.Tensor:
    allowed = allowed_keys(q_len, bias.shape[-1], doc_ids, key_padding_mask, bias.device)
    if keep_window_size is not None and bias.shape[-1] > keep_window_size:
        allowed = top_keys(bias.detach(), allowed, q_len, doc_ids, key_padding_mask, keep_window_size)
    return allowed


# ----------------------------------------------------------------------------- backends


def eager_attention(q, k, v, bias, *, scale, doc_ids=None, key_padding_mask=None, keep_window_size=None):
    """The reference: scores, bias, mask and softmax written out in float32."""
    b, hq, q_len, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    allowed = _final_mask(bias, q_len, doc_ids, key_padding_mask, keep_window_size)  # (B|1, Hkv|1, Tq, Tk)
    # Group query heads under their kv head instead of copying k and v `groups` times.
    qg = q.reshape(b, hkv, groups, q_len, d).float()
    scores = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale
    scores = scores + bias.float()[:, :, None, None, :]
    allowed = allowed[:, :, None]
    # A finite fill (not -inf) keeps fully masked rows free of NaN in both forward and backward.
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
    out = torch.matmul(probs, v.float()[:, :, None])
    return out.reshape(b, hq, q_len, d).to(q.dtype)


_KEY_COLUMNS = 8  # SDPA's fused CUDA kernels want head dims that are multiples of this
SPLIT_MIN_DOC = 64  # mean document length from which a packed CPU row is attended document by document


def sdpa_attention(q, k, v, bias, *, scale, doc_ids=None, key_padding_mask=None, keep_window_size=None):
    """torch's scaled_dot_product_attention, with the per-key bias folded into the keys.

    ``scale * q·k + bias_j == scale * [q, 1/scale]·[k, bias_j]``: one extra head-dim column turns the
    bias into part of the dot product, so SDPA's fused kernels (causal flag or a boolean mask) do the
    work and the bias gradient comes out of SDPA's own dk. This avoids the dense (B, H, Tq, Tk) float
    mask that transformers' Doge builds, which keeps SDPA on its math path (2-3x slower here on CPU,
    see benchmarks/RESULTS.md). The head dim grows to the next multiple of 8 above ``D`` (the bias column,
    then zero columns in q, k and v; the output is sliced back): CUDA's flash and memory-efficient SDPA
    kernels take only head dims that are multiples of 8, and a head dim of 129 would send them to the
    math path. Zero columns add nothing to the scores, so values and gradients are those of ``D + 1``.
    When the top-k keep window is active the selection differs per query, so the dense path is used.
    """
    b, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    groups = hq // hkv
    if doc_ids is not None and doc_ids.device.type == "cpu" and b == 1 and key_padding_mask is None \
            and q_len == k_len:
        # A packed row (SFT packs each micro batch into one): a masked call attends over the whole row,
        # so its cost grows with the square of the row, and a row longer than the keep window takes the
        # dense-mask path; documents of SPLIT_MIN_DOC tokens or more on average are cheaper as one call
        # each. The values are the same: the keep window selects among a query's own document's keys.
        starts = [0, *(torch.nonzero(doc_ids[0, 1:] != doc_ids[0, :-1]).flatten() + 1).tolist()]
        if k_len >= SPLIT_MIN_DOC * len(starts):
            ends = [*starts[1:], k_len]
            return torch.cat([sdpa_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], bias[..., s:e], scale=scale,
                                             keep_window_size=keep_window_size)
                              for s, e in zip(starts, ends)], dim=2)
    if keep_window_size is not None and k_len > keep_window_size:
        return _sdpa_dense_mask(q, k, v, bias, scale=scale, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
                                keep_window_size=keep_window_size)
    if doc_ids is not None and doc_ids.device.type == "cpu" and bool((doc_ids == doc_ids[:, -1:]).all()):
        doc_ids = None  # one document per row: plain causal (checked on CPU only: no device sync)
    pad = _KEY_COLUMNS - d % _KEY_COLUMNS  # the bias column, then zeros up to a multiple of 8
    q2 = torch.cat([q, q.new_full((b, hq, q_len, 1), 1.0 / scale), q.new_zeros(b, hq, q_len, pad - 1)], dim=-1)
    k2 = torch.cat([k, bias.unsqueeze(-1).to(k.dtype), k.new_zeros(b, hkv, k_len, pad - 1)], dim=-1)
    v2 = torch.cat([v, v.new_zeros(b, hkv, k_len, pad)], dim=-1)
    gqa = groups > 1
    if gqa and q_len > 1:
        # Training and prefill: each query head gets its kv head explicitly (a view when there is one
        # kv head) instead of enable_gqa, whose CPU flash backward measured 10-30 ms per layer slower at
        # Doge-20M's 2048 x (2 query, 1 kv) heads. Decoding (one query) keeps enable_gqa: there the
        # expansion would copy the whole cache every token (8x slower at 8/4 heads, 2048 keys).
        k2, v2 = (x[:, :, None].expand(b, hkv, groups, k_len, d + pad).reshape(b, hq, k_len, d + pad)
                  for x in (k2, v2))
        gqa = False
    if doc_ids is None and key_padding_mask is None and q_len == k_len:
        out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale, enable_gqa=gqa)
        return out[..., :d]
    allowed = allowed_keys(q_len, k_len, doc_ids, key_padding_mask, q.device)  # (B|1, 1, Tq, Tk)
    has_key = allowed.any(dim=-1, keepdim=True)
    # A query with no allowed key (left padding) attends to the last key instead of producing NaN;
    # its output is zeroed below, so neither the value nor any gradient leaks.
    allowed = allowed | (~has_key & (torch.arange(k_len, device=q.device) == k_len - 1))
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return out[..., :d] * has_key.to(out.dtype)


def _sdpa_dense_mask(q, k, v, bias, *, scale, doc_ids, key_padding_mask, keep_window_size):
    """SDPA with the bias and the top-k selection as one dense (B, Hq, Tq, Tk) float mask.

    Forced when the keep window is active: every query keeps a different key set.
    """
    hq, hkv = q.shape[1], k.shape[1]
    groups = hq // hkv
    allowed = _final_mask(bias, q.shape[2], doc_ids, key_padding_mask, keep_window_size)
    mask = bias[:, :, None, :].masked_fill(~allowed, torch.finfo(bias.dtype).min).to(q.dtype)
    if groups > 1:
        # Query heads of one kv head are adjacent, so each kv head's mask is repeated `groups` times.
        mask = mask.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    has_key = allowed.any(dim=-1, keepdim=True)
    if has_key.shape[1] > 1:
        has_key = has_key.repeat_interleave(groups, dim=1)
    return out * has_key.to(out.dtype)


def _autocast_inputs(q, k, v):
    """q, k, v in autocast's dtype when autocast is on, as SDPA (an autocast op) receives them. Under
    autocast q and k leave the fp32 RMSNorm in fp32 while v leaves its projection in bf16; the triton and
    flex backends are not autocast ops, so they would see mixed dtypes (the kernel refuses them)."""
    kind = q.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def triton_attention(q, k, v, bias, *, scale, doc_ids=None, key_padding_mask=None, keep_window_size=None):
    """The fused Triton kernel from ``doge_cli.kernels.dma_attention`` (imported on first use)."""
    q, k, v = _autocast_inputs(q, k, v)
    return _triton_fn()(
        q, k, v, bias, scale=scale, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
        keep_window_size=keep_window_size,
    )


@functools.cache
def _triton_fn() -> Callable:
    try:
        module = importlib.import_module("doge_cli.kernels.dma_attention")
        return module.dma_attention
    except (ImportError, AttributeError) as err:  # pragma: no cover - the module is part of the package
        raise DogeError(f"the triton attention backend failed to import ({err}); choose attn_implementation='sdpa'") from err


def _flex(name: str) -> Callable:
    from doge_cli.model import flex

    return getattr(flex, name)


def flex_attention(q, k, v, bias, *, scale, doc_ids=None, key_padding_mask=None, keep_window_size=None,
                   block_mask=None):
    """torch flex_attention: score_mod adds the bias, a block mask carries causal + documents.

    ``block_mask`` (from :func:`build_block_mask`) is built once per batch and shared by all layers;
    when it is None one is built here. Lives in ``doge_cli.model.flex`` (imported on first use).
    """
    q, k, v = _autocast_inputs(q, k, v)
    return _flex("flex_attention")(
        q, k, v, bias, scale=scale, doc_ids=doc_ids, key_padding_mask=key_padding_mask,
        keep_window_size=keep_window_size, block_mask=block_mask,
    )


def build_block_mask(batch: int, q_len: int, k_len: int, doc_ids, key_padding_mask, device):
    """The flex block mask (causal + documents + padding) for one batch; share it across layers."""
    return _flex("build_block_mask")(batch, q_len, k_len, doc_ids, key_padding_mask, device)


_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "triton": triton_attention,
}


_AUTO_NOTICES: set[tuple[str, str]] = set()


def resolve_backend(name: str, device: torch.device | str | None = None, head_dim: int | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """Turn a backend name (or ``auto``) into one of :data:`BACKENDS`.

    ``auto``: ``triton`` on CUDA where the kernel can run (``doge_cli.kernels.unavailable_reason``, the
    one source of truth; given the model's ``head_dim`` and compute ``dtype``, the kernel is also compiled
    and run once there, ``doge_cli.kernels.probe``), else ``sdpa``, saying once in the log why triton was
    passed over on a GPU.
    On CPU sdpa is the choice: in benchmarks/model_step.py it was the fastest or near-fastest CPU training
    step at 1x2048 (noisy runs, see benchmarks/RESULTS.md), while CPU flex is torch's uncompiled dense
    reference (torch 2.13 compiles flex on CPU for inference only) plus our dense backward.
    """
    if name == "auto":
        from doge_cli.kernels import probe, unavailable_reason

        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cuda":
            return "sdpa"
        reason = unavailable_reason(device)
        if reason is None and head_dim is not None:
            reason = probe(device, head_dim, dtype or torch.float32)
        if reason is None:
            return "triton"
        if (str(device), reason) not in _AUTO_NOTICES:
            _AUTO_NOTICES.add((str(device), reason))
            logger.warning("attention auto: the triton kernel cannot run on %s (%s); using sdpa", device, reason)
        return "sdpa"
    if name not in _FUNCTIONS:
        raise DogeError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


def check_backend_runs(name: str, device: torch.device | str, head_dim: int | None = None,
                       dtype: torch.dtype | None = None) -> None:
    """Refuse, in one line, a resolved backend that cannot run on ``device`` (before any work is done);
    with the model's ``head_dim`` and compute ``dtype`` the Triton kernel is compiled and run once there."""
    if name == "triton":
        from doge_cli.kernels import probe, unavailable_reason

        reason = unavailable_reason(device)
        if reason is None and head_dim is not None:
            reason = probe(device, head_dim, dtype or torch.float32)
        if reason is not None:
            raise DogeError(f"attention backend 'triton' cannot run on {torch.device(device)}: {reason}; use "
                            "runtime.attn_implementation=sdpa, or auto (which picks a backend that runs)")


def get_backend(name: str) -> Callable:
    """The attention function of a resolved backend name (see :func:`resolve_backend`)."""
    if name not in _FUNCTIONS:
        raise DogeError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        _triton_fn()  # fail at model construction, not mid-forward, when the kernel is missing
    return _FUNCTIONS[name]
