"""Triton kernels for dynamic-mask attention (imported lazily by ``dma_attention``).

Forward and backward follow FlashAttention-2 (Dao, 2023): each program owns a block of queries
(forward, dq) or keys (dk, dv, dbias), streams the other side through on-chip memory, and keeps a
running max / sum for the softmax ("online softmax", Milakov & Gimelshein 2018) so the
(queries x keys) matrix never reaches global memory. The backward recomputes the probabilities
from the saved log-sum-exp and uses ``delta = rowsum(dO * O)`` (FlashAttention-2, Alg. 2).

Doge's additions to plain causal attention are all folded into the score tile:
- ``+ bias[kv_head, key]``: the dynamic-mask bias (Doge, Shi et al. 2024); since
  d(score)/d(bias) = 1, d(bias) is the column sum of dS, reduced inside the dk/dv program, which
  owns whole key columns for every query head of its kv-head group, so no atomics are needed.
- causal, packed-document and key-padding masks;
- the top-k keep window, given as a per-(kv head, query) threshold and tie cut computed beforehand.

Masked scores are -inf; a query with no allowed key ends with l = 0 and writes zeros, and its
log-sum-exp is stored as +inf so the backward's exp2(s - lse) is 0 there too.

This module must be imported after TRITON_INTERPRET is set (triton reads it when the kernels
are decorated); ``dma_attention`` imports it on first use for that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import torch
import triton
import triton.language as tl

from doge_cli.kernels import launch

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634

INTERPRET = bool(triton.knobs.runtime.interpret)

_FILL_NAN = contextvars.ContextVar("doge_dma_fill_nan", default=False)


@contextlib.contextmanager
def unwritten_as_nan():
    """Within this block the kernels' outputs start as NaN instead of uninitialised memory, so an
    element they never write shows up as NaN (benchmarks/kernels_gpu.py's correctness check)."""
    token = _FILL_NAN.set(True)
    try:
        yield
    finally:
        _FILL_NAN.reset(token)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if _FILL_NAN.get() else out


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST works around triton's interpreter, whose dot
    multiplies the raw uint16 storage of bf16 tensors; the upcast is exact, so the result is
    what a bf16 tensor-core dot with fp32 accumulation gives."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _allowed(offs_m, offs_n, q_pos, Tq, Tk, b, hk, Hkv,
             Doc, s_doc_b, s_doc_t, Pad, s_pad_b, s_pad_t, Thr, bias,
             HAS_DOC: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TOPK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: which (query, key) pairs may attend."""
    m_in = offs_m < Tq
    n_in = offs_n < Tk
    ok = (offs_n[None, :] <= q_pos[:, None]) & n_in[None, :] & m_in[:, None]
    if HAS_PAD:
        pad = tl.load(Pad + b * s_pad_b + offs_n * s_pad_t, mask=n_in, other=0)
        ok = ok & (pad != 0)[None, :]
    if HAS_DOC:
        q_doc = tl.load(Doc + b * s_doc_b + q_pos * s_doc_t, mask=m_in, other=-1)
        k_doc = tl.load(Doc + b * s_doc_b + offs_n * s_doc_t, mask=n_in, other=-2)
        ok = ok & (q_doc[:, None] == k_doc[None, :])
    if HAS_TOPK:
        # Thr is (B, Hkv, Tq, 2): threshold, then the first kept position among keys tied with it.
        row = ((b * Hkv + hk) * Tq + offs_m) * 2
        thr = tl.load(Thr + row, mask=m_in, other=float("inf"))
        cut = tl.load(Thr + row + 1, mask=m_in, other=0.0)
        above = bias[None, :] > thr[:, None]
        tie_kept = (bias[None, :] == thr[:, None]) & (offs_n[None, :].to(tl.float32) >= cut[:, None])
        ok = ok & (above | tie_kept)
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Thr, Doc, Pad, Out, Lse,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_bb, s_bh, s_bt,
    s_doc_b, s_doc_t, s_pad_b, s_pad_t,
    s_ob, s_oh, s_ot, s_od,
    Hq, Hkv, GROUP, Tq, Tk, D, scale,
    HAS_DOC: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    m_in = offs_m < Tq
    q_pos = offs_m + (Tk - Tq)

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the fast instruction

    # Causal: keys past the last query of this block are never visible.
    hi = tl.minimum(Tk, Tk - Tq + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < Tk
        kt = tl.load(K + b * s_kb + hk * s_kh + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0)
        v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
                    mask=n_in[:, None] & d_in[None, :], other=0.0)
        bias = tl.load(Bias + b * s_bb + hk * s_bh + offs_n * s_bt, mask=n_in, other=0.0).to(tl.float32)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale + bias[None, :] * 1.4426950408889634
        ok = _allowed(offs_m, offs_n, q_pos, Tq, Tk, b, hk, Hkv, Doc, s_doc_b, s_doc_t,
                      Pad, s_pad_b, s_pad_t, Thr, bias, HAS_DOC, HAS_PAD, HAS_TOPK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("inf"))
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
             out.to(Out.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=m_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, Thr, Doc, Pad, DO, Lse, Delta, DK, DV, DB,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_bb, s_bh, s_bt,
    s_doc_b, s_doc_t, s_pad_b, s_pad_t,
    s_dob, s_doh, s_dot, s_dod,
    s_dkb, s_dkh, s_dkt, s_dkd,
    s_dvb, s_dvh, s_dvt, s_dvd,
    Hq, Hkv, GROUP, Tq, Tk, D, scale,
    HAS_DOC: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    n_in = offs_n < Tk
    qk_scale = scale * 1.4426950408889634

    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :] * s_kd,
                mask=n_in[:, None] & d_in[None, :], other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd,
                mask=n_in[:, None] & d_in[None, :], other=0.0)
    bias = tl.load(Bias + b * s_bb + hk * s_bh + offs_n * s_bt, mask=n_in, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)

    # Causal: queries before the first key of this block (in key positions) never see it.
    lo = tl.maximum(pid_n * BLOCK_N - (Tk - Tq), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_in = offs_m < Tq
            q_pos = offs_m + (Tk - Tq)
            q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                        mask=m_in[:, None] & d_in[None, :], other=0.0)
            do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot + offs_d[None, :] * s_dod,
                         mask=m_in[:, None] & d_in[None, :], other=0.0)
            lse = tl.load(Lse + bh * Tq + offs_m, mask=m_in, other=float("inf"))
            delta = tl.load(Delta + bh * Tq + offs_m, mask=m_in, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale + bias[None, :] * 1.4426950408889634
            ok = _allowed(offs_m, offs_n, q_pos, Tq, Tk, b, hk, Hkv, Doc, s_doc_b, s_doc_t,
                          Pad, s_pad_b, s_pad_t, Thr, bias, HAS_DOC, HAS_PAD, HAS_TOPK)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            db += tl.sum(ds, 0)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    dk = dk * scale
    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=n_in[:, None] & d_in[None, :])
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvt + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=n_in[:, None] & d_in[None, :])
    tl.store(DB + pid_bh.to(tl.int64) * Tk + offs_n, db, mask=n_in)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, Thr, Doc, Pad, DO, Lse, Delta, DQ,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_bb, s_bh, s_bt,
    s_doc_b, s_doc_t, s_pad_b, s_pad_t,
    s_dob, s_doh, s_dot, s_dod,
    s_dqb, s_dqh, s_dqt, s_dqd,
    Hq, Hkv, GROUP, Tq, Tk, D, scale,
    HAS_DOC: tl.constexpr, HAS_PAD: tl.constexpr, HAS_TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    m_in = offs_m < Tq
    q_pos = offs_m + (Tk - Tq)
    qk_scale = scale * 1.4426950408889634

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + offs_m[:, None] * s_dot + offs_d[None, :] * s_dod,
                 mask=m_in[:, None] & d_in[None, :], other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_in, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Tq + offs_m, mask=m_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = tl.minimum(Tk, Tk - Tq + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < Tk
        kt = tl.load(K + b * s_kb + hk * s_kh + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0)
        vt = tl.load(V + b * s_vb + hk * s_vh + offs_n[None, :] * s_vt + offs_d[:, None] * s_vd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0)
        bias = tl.load(Bias + b * s_bb + hk * s_bh + offs_n * s_bt, mask=n_in, other=0.0).to(tl.float32)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale + bias[None, :] * 1.4426950408889634
        ok = _allowed(offs_m, offs_n, q_pos, Tq, Tk, b, hk, Hkv, Doc, s_doc_b, s_doc_t,
                      Pad, s_pad_b, s_pad_t, Thr, bias, HAS_DOC, HAS_PAD, HAS_TOPK)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)

    dq = dq * scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])


_CHOSEN: dict[tuple, int] = {}  # (device, kind, head dim, dtype) -> index of the configuration that launched


def _configs(kind: str, q: torch.Tensor) -> list[launch.LaunchConfig]:
    """The launch configurations to try for ``q``'s device, fastest first (doge_cli.kernels.launch)."""
    if INTERPRET or q.device.type != "cuda":
        return [launch.INTERPRETER]
    return launch.choose(kind, q.shape[-1], q.dtype, torch.cuda.get_device_properties(q.device))


def _launch(kind: str, q: torch.Tensor, run) -> None:
    """Call ``run(config_kwargs)`` with the first configuration that launches on ``q``'s device. A
    configuration that runs out of shared memory or registers despite the estimate is passed over for
    the next one, said once in the log; any other error, or running out with the last one, is raised."""
    configs = _configs(kind, q)
    key = (str(q.device), kind, q.shape[-1], q.dtype)
    start = _CHOSEN.get(key, 0)
    for index in range(start, len(configs)):
        try:
            run(configs[index].kwargs(q.shape[-1]))
        except triton.runtime.errors.OutOfResources as err:
            if index + 1 == len(configs):
                raise
            logger.warning("dma attention %s on %s (head dim %d, %s): %s ran out of resources (%s); trying %s",
                           kind, q.device, q.shape[-1], str(q.dtype).removeprefix("torch."), configs[index], err,
                           configs[index + 1])
            continue
        _CHOSEN[key] = index
        return


def _aux(q, bias, threshold, doc_ids, key_padding_mask):
    """Pointers and strides for the optional inputs (any tensor stands in when absent)."""
    doc = doc_ids if doc_ids is not None else bias
    pad = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else bias
    thr = threshold if threshold is not None else bias
    doc_strides = (doc_ids.stride(0), doc_ids.stride(1)) if doc_ids is not None else (0, 0)
    pad_strides = (pad.stride(0), pad.stride(1)) if key_padding_mask is not None else (0, 0)
    flags = {"HAS_DOC": doc_ids is not None, "HAS_PAD": key_padding_mask is not None,
             "HAS_TOPK": threshold is not None,
             "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
             "UPCAST": INTERPRET and q.dtype == torch.bfloat16}
    return thr, doc, pad, doc_strides, pad_strides, flags


def forward(q, k, v, bias, threshold, doc_ids, key_padding_mask, scale):
    """Run the forward kernel; returns (out, lse) with lse in base-2 units, shape (B, Hq, Tq)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = _empty_like(q)
    lse = _empty_like(torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device))
    thr, doc, pad, doc_s, pad_s, flags = _aux(q, bias, threshold, doc_ids, key_padding_mask)

    def run(cfg: dict) -> None:
        _fwd_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](
            q, k, v, bias, thr, doc, pad, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *bias.stride(), *doc_s, *pad_s, *out.stride(),
            Hq, Hkv, Hq // Hkv, Tq, Tk, D, scale, **flags, **cfg,
        )
    _launch("forward", q, run)
    return out, lse


def backward(do, q, k, v, bias, out, lse, threshold, doc_ids, key_padding_mask, scale):
    """Run the two backward kernels; returns (dq, dk, dv, dbias)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    delta = (out.float() * do.float()).sum(-1).contiguous()
    dq = _empty_like(q)
    dk = _empty_like(k)
    dv = _empty_like(v)
    dbias = _empty_like(torch.empty((B, Hkv, Tk), dtype=torch.float32, device=q.device))
    thr, doc, pad, doc_s, pad_s, flags = _aux(q, bias, threshold, doc_ids, key_padding_mask)
    common = (*q.stride(), *k.stride(), *v.stride(), *bias.stride(), *doc_s, *pad_s, *do.stride())

    def run(cfg: dict) -> None:
        _bwd_dkdv_kernel[(triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)](
            q, k, v, bias, thr, doc, pad, do, lse, delta, dk, dv, dbias,
            *common, *dk.stride(), *dv.stride(),
            Hq, Hkv, Hq // Hkv, Tq, Tk, D, scale, **flags, **cfg,
        )
        _bwd_dq_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](
            q, k, v, bias, thr, doc, pad, do, lse, delta, dq,
            *common, *dq.stride(),
            Hq, Hkv, Hq // Hkv, Tq, Tk, D, scale, **flags, **cfg,
        )
    _launch("backward", q, run)
    return dq, dk, dv, dbias.to(bias.dtype)
