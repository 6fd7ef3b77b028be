import os

import pytest
import torch

from doge_cli.errors import DogeError
from doge_cli.kernels import is_available
from doge_cli.kernels.dma_attention import (
    dma_attention,
    dma_attention_reference,
    keep_window_mask,
    keep_window_threshold,
)

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1"


def _make(B, Hq, Hkv, Tq, Tk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    bias = torch.randn(B, Hkv, Tk, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, bias)]


def _run(fn, inputs, grad_out, **kw):
    out = fn(*inputs, **kw)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def _close(a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max error {err:.3g} vs scale {scale:.3g}"


CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, docs, padding, keep_window)
    "plain": (1, 2, 2, 16, 16, 16, False, False, None),
    "gqa_odd_lengths": (2, 4, 2, 19, 19, 16, False, False, None),
    "packed_docs": (2, 2, 1, 21, 21, 16, True, False, None),
    "topk": (1, 4, 2, 23, 23, 16, False, False, 7),
    "topk_docs_padding": (2, 2, 1, 20, 20, 32, True, True, 5),
    "decode_tq_lt_tk": (2, 4, 1, 3, 29, 16, True, True, 9),
    "single_query": (1, 2, 2, 1, 17, 16, False, False, None),
    "head_dim_64": (1, 2, 1, 17, 17, 64, True, False, 6),
    "head_dim_128": (1, 1, 1, 18, 18, 128, False, False, None),
    "head_dim_48_not_pow2": (1, 2, 2, 9, 9, 48, False, False, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_and_fp64(name):
    B, Hq, Hkv, Tq, Tk, D, docs, padding, keep = CASES[name]
    inputs = _make(B, Hq, Hkv, Tq, Tk, D, seed=len(name))
    g = torch.Generator().manual_seed(1)
    doc_ids = None
    if docs:
        # Random document boundaries per row, ids not starting at 0.
        doc_ids = torch.cumsum(torch.rand(B, Tk, generator=g) < 0.25, dim=1) + 3
    kpm = None
    if padding:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[0, :2] = False  # left padding: query 0 of row 0 has no key at all
        kpm[-1, -3:] = False
    kw = dict(scale=D**-0.5, doc_ids=doc_ids, key_padding_mask=kpm, keep_window_size=keep)
    grad_out = torch.randn(B, Hq, Tq, D, generator=g)

    out, grads = _run(dma_attention, inputs, grad_out, **kw)
    ref, ref_grads = _run(dma_attention_reference, inputs, grad_out, **kw)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref64, ref64_grads = _run(dma_attention_reference, inputs64, grad_out.double(), **kw)

    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    _close(out, ref, 1e-5)
    _close(out, ref64, 1e-5)
    for got, want, want64 in zip(grads, ref_grads, ref64_grads, strict=True):
        _close(got, want, 1e-5)
        _close(got, want64, 1e-5)
    if padding and Tq == Tk:
        assert (out[0, :, 0] == 0).all()  # every key masked: zeros, not NaN


def test_every_key_masked_gives_zeros_and_finite_grads():
    inputs = _make(1, 2, 1, 16, 16, 16)
    kpm = torch.zeros(1, 16, dtype=torch.bool)
    kpm[0, 10:] = True  # queries 0..9 see nothing
    out = dma_attention(*inputs, scale=0.25, doc_ids=None, key_padding_mask=kpm, keep_window_size=None)
    assert (out[:, :, :10] == 0).all()
    assert out[:, :, 10:].abs().sum() > 0
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(torch.isfinite(t).all() for t in grads)
    ref = dma_attention_reference(*inputs, scale=0.25, doc_ids=None, key_padding_mask=kpm, keep_window_size=None)
    _close(out, ref, 1e-5)


def test_non_contiguous_inputs():
    # The model produces q/k/v as transposed views of (B, T, H, D) projections.
    B, T, Hq, Hkv, D = 1, 18, 2, 1, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    bias = torch.randn(B, T, Hkv, generator=g).transpose(1, 2).requires_grad_()
    kw = dict(scale=0.25, doc_ids=None, key_padding_mask=None, keep_window_size=None)
    grad_out = torch.randn(B, Hq, T, D, generator=g)
    out, grads = _run(dma_attention, [q, k, v, bias], grad_out, **kw)
    ref, ref_grads = _run(dma_attention_reference, [q, k, v, bias], grad_out, **kw)
    _close(out, ref, 1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        _close(a, b, 1e-5)


def test_bf16_runs_and_stays_close():
    inputs = _make(1, 2, 1, 17, 17, 16, dtype=torch.bfloat16)
    kw = dict(scale=0.25, doc_ids=None, key_padding_mask=None, keep_window_size=None)
    out = dma_attention(*inputs, **kw)
    assert out.dtype == torch.bfloat16
    ref = dma_attention_reference(*[t.detach().double() for t in inputs], **kw)
    _close(out, ref, 2e-2)
    grads = torch.autograd.grad(out.float().sum(), inputs)
    assert [t.dtype for t in grads] == [torch.bfloat16] * 4


def test_threshold_keeps_k_keys_and_minus_inf_when_fewer():
    bias = torch.randn(1, 1, 10, generator=torch.Generator().manual_seed(0))
    window = keep_window_threshold(bias, 10, 3)
    kept = keep_window_mask(window, bias)[0, 0] & torch.ones(10, 10, dtype=torch.bool).tril()
    assert kept.sum(-1).tolist() == [1, 2] + [3] * 8
    thr = window[0, 0, :, 0]
    assert torch.isinf(thr[:2]).all() and (thr[:2] < 0).all()


def test_ties_keep_exactly_k_latest_keys():
    """Equal biases (A = 0 at init, or repeated tokens): the window is the k latest allowed keys."""
    B, H, T, D, keep = 1, 2, 21, 16, 5
    q, k, v, bias = _make(B, H, H, T, T, D, seed=4)
    with torch.no_grad():
        bias.fill_(1.0)
        bias[0, 1, ::3] = 2.0  # head 1: a mix of ties and distinct values
    doc_ids = torch.tensor([[0] * 9 + [1] * 12])
    kw = dict(scale=D**-0.5, doc_ids=doc_ids, key_padding_mask=None, keep_window_size=keep)
    window = keep_window_threshold(bias, T, keep, doc_ids)
    allowed = (torch.ones(T, T, dtype=torch.bool).tril() & (doc_ids[0][:, None] == doc_ids[0][None, :]))
    kept = keep_window_mask(window, bias)[0] & allowed
    assert (kept.sum(-1) == allowed.sum(-1).clamp(max=keep)).all()
    # Head 0: all tied, so a sliding window of the `keep` most recent keys of the same document.
    pos = torch.arange(T)
    assert torch.equal(kept[0], allowed & (pos[None, :] > pos[:, None] - keep))

    grad_out = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(2))
    out, grads = _run(dma_attention, [q, k, v, bias], grad_out, **kw)
    ref, ref_grads = _run(dma_attention_reference, [q, k, v, bias], grad_out, **kw)
    _close(out, ref, 1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        _close(a, b, 1e-5)


def test_reference_matches_transformers_topk_rule():
    """The reference against transformers' own prepare_dynamic_mask + eager softmax."""
    from transformers.models.doge.modeling_doge import DogeAttention

    B, H, T, D, keep = 1, 2, 12, 16, 5
    q, k, v, bias = [t.detach() for t in _make(B, H, H, T, T, D, seed=3)]
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    mask = DogeAttention.prepare_dynamic_mask(None, torch.empty(B, T, 1), bias, keep, causal)
    probs = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5 + mask, dim=-1)
    want = probs @ v
    got = dma_attention_reference(q, k, v, bias, scale=D**-0.5, doc_ids=None, key_padding_mask=None,
                                  keep_window_size=keep)
    _close(got, want, 1e-5)
    got_kernel = dma_attention(q, k, v, bias, scale=D**-0.5, doc_ids=None, key_padding_mask=None,
                               keep_window_size=keep)
    _close(got_kernel, want, 1e-5)


def test_no_silent_fallback_without_interpreter(monkeypatch):
    from doge_cli.kernels import unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not is_available("cpu") and "TRITON_INTERPRET" in unavailable_reason("cpu")
    inputs = [t.detach() for t in _make(1, 2, 1, 5, 5, 16)]
    kw = dict(scale=0.25, doc_ids=None, key_padding_mask=None, keep_window_size=None)
    with pytest.raises(DogeError, match="cannot run on cpu.*attn_implementation=sdpa"):
        dma_attention(*inputs, **kw)


def test_unsupported_dtype_is_refused():
    inputs = [t.detach().double() for t in _make(1, 2, 1, 5, 5, 16)]
    with pytest.raises(DogeError, match="fp32, bf16 or fp16"):
        dma_attention(*inputs, scale=0.25)


def test_unavailable_reasons_without_triton_or_on_old_gpus(monkeypatch):
    import doge_cli.kernels as kernels

    monkeypatch.setattr(kernels, "_triton_importable", lambda: False)
    assert "not installed" in kernels.unavailable_reason("cuda")
    monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert "7.5" in kernels.unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert kernels.unavailable_reason("cuda") is None


def test_is_available():
    assert is_available("cpu")  # TRITON_INTERPRET=1 from tests/conftest.py
    assert is_available(torch.device("cpu"))
    assert not is_available("meta")


def test_opcheck_fake_and_autograd_registration():
    q, k, v, bias = [t.detach().requires_grad_() for t in _make(1, 2, 1, 16, 16, 16)]
    thr = keep_window_threshold(bias.detach(), 16, 4)  # (B, Hkv, Tq, 2): threshold and tie cut
    torch.library.opcheck(torch.ops.doge.dma_attention_fwd, (q, k, v, bias, thr, None, None, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_through_the_op():
    inputs = _make(1, 2, 1, 16, 16, 16)
    kw = dict(scale=0.25, doc_ids=None, key_padding_mask=None, keep_window_size=None)

    def f(q, k, v, bias):
        return dma_attention(q, k, v, bias, **kw).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(f(*inputs), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        _close(a, b, 1e-6)


def test_bad_shapes_raise_doge_error():
    q, k, v, bias = [t.detach() for t in _make(1, 3, 2, 4, 4, 16)]
    with pytest.raises(DogeError, match="multiple"):
        dma_attention(q, k, v, bias, scale=1.0, doc_ids=None, key_padding_mask=None, keep_window_size=None)
    q, k, v, bias = [t.detach() for t in _make(1, 2, 1, 4, 4, 16)]
    with pytest.raises(DogeError, match="bias"):
        dma_attention(q, k, v, bias[:, :, :3], scale=1.0, doc_ids=None, key_padding_mask=None,
                      keep_window_size=None)
