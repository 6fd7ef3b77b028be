"""The sdpa backend's three paths (causal flag, boolean mask, dense top-k mask) against eager (which
computes in fp32, so fp32 tolerances)."""

import pytest
import torch

from doge_cli.model.attention import eager_attention, sdpa_attention


def inputs(b=2, hq=4, hkv=2, tq=37, tk=37, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=gen, dtype=torch.float32, requires_grad=True)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=torch.float32, requires_grad=True)
    v = torch.randn(b, hkv, tk, d, generator=gen, dtype=torch.float32, requires_grad=True)
    bias = (torch.rand(b, hkv, tk, generator=gen, dtype=torch.float32) * 3).requires_grad_()
    return q, k, v, bias


def docs(b, t):
    ids = torch.zeros(b, t, dtype=torch.long)
    ids[:, 11:] = 1
    ids[1, 25:] = 2
    return ids


def assert_same_values_and_gradients(got, want, leaves):
    """fp32 tolerances: values to 1e-5, the gradients of q, k, v and bias to 1e-4."""
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    gw = torch.autograd.grad(want, leaves, grad)
    gg = torch.autograd.grad(got, leaves, grad)
    for name, a, b in zip("q k v bias".split(), gg, gw):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


CASES = {
    "causal": {},
    "documents": {"doc_ids": docs(2, 37)},
    "single_document_ids": {"doc_ids": torch.zeros(2, 37, dtype=torch.long)},
    "left_padding": {"key_padding_mask": torch.arange(37)[None].repeat(2, 1) >= torch.tensor([[0], [9]])},
    "decode": {"tq": 5},
    "top_k": {"keep_window_size": 8},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_paths_match_eager(case):
    kwargs = dict(CASES[case])
    tq = kwargs.pop("tq", 37)
    q, k, v, bias = inputs(tq=tq)
    scale = 16**-0.5
    want = eager_attention(q, k, v, bias, scale=scale, **kwargs)
    got = sdpa_attention(q, k, v, bias, scale=scale, **kwargs)
    assert_same_values_and_gradients(got, want, (q, k, v, bias))
    if case == "left_padding":
        assert got[1, :, :9].abs().max() == 0  # queries with no real key give zeros, not NaN


@pytest.mark.parametrize("d", [7, 12, 16, 64])
@pytest.mark.parametrize("case", ["causal", "documents", "decode"])
def test_the_padded_head_dim_is_a_multiple_of_8_and_changes_nothing(d, case, monkeypatch):
    """The bias column plus zero padding make the head dim SDPA sees a multiple of 8 (CUDA's fused kernels
    need it); the result and every gradient equal eager's at any head dim."""
    import torch.nn.functional as F

    from doge_cli.model import attention

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    kwargs = dict(CASES[case])
    tq = kwargs.pop("tq", 37)
    q, k, v, bias = inputs(tq=tq, d=d, seed=d)
    want = eager_attention(q, k, v, bias, scale=d**-0.5, **kwargs)
    got = sdpa_attention(q, k, v, bias, scale=d**-0.5, **kwargs)
    width = seen[0][0]
    assert width % 8 == 0 and d < width <= d + 8 and seen[0] == (width, width, width)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    for name, a, b in zip("q k v bias".split(), torch.autograd.grad(got, (q, k, v, bias), grad),
                          torch.autograd.grad(want, (q, k, v, bias), grad)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def packed(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


@pytest.mark.parametrize("lengths, window", [
    ((70, 90, 100), 128),   # the row exceeds the keep window, every document fits in it
    ((200, 80), 128),       # one document longer than the window: top-k within it
    ((70, 90, 100), None),  # no window
    ((10, 12, 9, 8), 16),   # short documents (under SPLIT_MIN_DOC): one masked call, dense top-k path
])
def test_a_packed_row_attended_document_by_document_matches_eager(lengths, window, monkeypatch):
    """SFT packs a micro batch into one row; on CPU sdpa then attends document by document (without
    the whole-row mask, and below the keep window) and must give eager's values and gradients."""
    import doge_cli.model.attention as attention

    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    t = sum(lengths)
    q, k, v, bias = inputs(b=1, tq=t, tk=t)
    doc_ids = packed(lengths)
    scale = 16**-0.5
    want = eager_attention(q, k, v, bias, scale=scale, doc_ids=doc_ids, keep_window_size=window)
    got = sdpa_attention(q, k, v, bias, scale=scale, doc_ids=doc_ids, keep_window_size=window)
    split = t >= attention.SPLIT_MIN_DOC * len(lengths)
    assert calls == (list(lengths) if split else [t])
    assert_same_values_and_gradients(got, want, (q, k, v, bias))
