import pytest
import torch
import torch.nn.functional as F

from doge_cli.errors import DogeError
from doge_cli.kernels import linear_cross_entropy as lce
from doge_cli.kernels.linear_cross_entropy import linear_cross_entropy, linear_logprobs


def _inputs(n=37, d=16, v=53, ignore_frac=0.3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_matches_full_logits_cross_entropy(reduction, chunk_size):
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size)
    dh, dw = torch.autograd.grad(loss * 1.7, (hidden, weight))

    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction=reduction)
    rdh, rdw = torch.autograd.grad(ref * 1.7, (hidden, weight))
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(dh, rdh) <= 1e-5
    assert _rel(dw, rdw) <= 1e-5


def test_fp64_oracle_agrees():
    hidden, weight, targets = _inputs(n=20, v=300)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
    ref = F.cross_entropy(hidden.double() @ weight.double().t(), targets)
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, targets = _inputs()
    targets.fill_(-100)
    for reduction in ("mean", "sum"):
        loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=8)
        dh, dw = torch.autograd.grad(loss, (hidden, weight))
        assert loss.item() == 0.0
        assert torch.isfinite(loss)
        assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_custom_ignore_index():
    hidden, weight, targets = _inputs(ignore_frac=0.0)
    targets[::3] = 5
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=5, chunk_size=10)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=5)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_only_hidden_requires_grad_and_no_grad_mode():
    hidden, weight, targets = _inputs()
    weight = weight.detach()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    (rdh,) = torch.autograd.grad(ref, (hidden,))
    assert _rel(dh, rdh) <= 1e-5
    with torch.no_grad():
        assert abs(linear_cross_entropy(hidden, weight, targets).item() - ref.item()) <= 1e-5 * ref.item()


def test_bf16_autocast_close_to_fp32_and_grads_reach_fp32_weights():
    hidden, weight, targets = _inputs(n=64, d=32, v=128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert loss.dtype == torch.float32
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    rdh, rdw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(loss.item() - ref.item()) <= 2e-2 * ref.item()
    assert _rel(dh, rdh) <= 5e-2
    assert _rel(dw, rdw) <= 5e-2


def test_bf16_inputs():
    hidden, weight, targets = _inputs(n=64, d=32, v=128, dtype=torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    ref = F.cross_entropy((hidden.float() @ weight.float().t()), targets)
    rdh, rdw = torch.autograd.grad(ref, (hidden, weight))
    assert abs(loss.item() - ref.item()) <= 2e-2 * ref.item()
    assert _rel(dh.float(), rdh.float()) <= 5e-2
    assert _rel(dw.float(), rdw.float()) <= 5e-2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax(temperature):
    hidden, weight, targets = _inputs()
    lp = linear_logprobs(hidden, weight, targets, chunk_size=8, temperature=temperature)
    upstream = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
    dh, dw = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))

    full = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)
    valid = targets != -100
    ref = torch.where(valid, full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    rdh, rdw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    assert _rel(lp, ref) <= 1e-5
    assert (lp[~valid] == 0).all()
    assert _rel(dh, rdh) <= 1e-5
    assert _rel(dw, rdw) <= 1e-5


def test_logprobs_of_fp64_inputs_are_computed_in_fp64():
    """fp64 in, fp64 throughout (oracle comparisons in fp64 run through the fused head): agreement to ~1e-15."""
    hidden, weight, targets = (t.double() if t.is_floating_point() else t for t in _inputs())
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    lp = linear_logprobs(hidden, weight, targets, chunk_size=8, temperature=0.7)
    assert lp.dtype == torch.float64
    upstream = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dh, dw = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))
    full = torch.log_softmax((hidden @ weight.t()) / 0.7, dim=-1)
    valid = targets != -100
    ref = torch.where(valid, full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    rdh, rdw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    assert dh.dtype == dw.dtype == torch.float64
    assert _rel(lp, ref) <= 1e-13 and _rel(dh, rdh) <= 1e-13 and _rel(dw, rdw) <= 1e-13


def test_bad_shapes_and_arguments_raise_doge_error():
    hidden, weight, targets = _inputs()
    with pytest.raises(DogeError):
        linear_cross_entropy(hidden[:, :5], weight, targets)
    with pytest.raises(DogeError):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(DogeError):
        linear_logprobs(hidden, weight, targets, temperature=0.0)


def test_chunk_buffers_are_reused_across_calls_and_rebuilt_for_new_shapes():
    workspace = lce.LossWorkspace()
    hidden, weight, targets = _inputs(n=40, v=300)
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    rdh, rdw = torch.autograd.grad(ref, (hidden, weight))
    results, pointers = [], []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16, workspace=workspace)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
        pointers.append({k: b.data_ptr() for k, b in workspace.buffers.items()})
    assert pointers[0] == pointers[1] and set(pointers[0]) == {"fp32", "logits", "outer"}
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))  # a reused buffer changes nothing
    assert abs(results[0][0].item() - ref.item()) <= 2e-2 * ref.item()
    assert _rel(results[0][1], rdh) <= 5e-2 and _rel(results[0][2], rdw) <= 5e-2
    # Another shape and dtype in between rebuilds the buffers and stays exact.
    other_h, other_w, other_t = _inputs(n=9, d=8, v=70, seed=1)
    got = linear_cross_entropy(other_h, other_w, other_t, chunk_size=4, workspace=workspace)
    assert abs(got.item() - F.cross_entropy(other_h @ other_w.t(), other_t).item()) <= 1e-5 * got.item()
    assert workspace.buffers["fp32"].shape == (4, 70)
    workspace.release()
    assert workspace.buffers == {}
