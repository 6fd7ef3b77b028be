"""Fused linear + cross-entropy without materialising the (tokens x vocab) logits.

The language-model head of a small model dominates activation memory: at 8 x 2048 tokens and a
32768 vocabulary the fp32 logits alone take 2 GiB, and their softmax and gradient as much again.
Here the tokens are processed in chunks: for each chunk the logits are computed, reduced to the
loss, and (when gradients are needed) turned straight into that chunk's contribution to
d(hidden) and d(weight), so at most ``chunk_size x vocab`` logits exist at a time. This is the
chunked approach of "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024)
and of Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024), written as plain PyTorch so
it runs on every device.

Precision: the matrix products run in the input dtype (bf16 under autocast, like the unfused
``lm_head`` would), the log-sum-exp, softmax and the weight-gradient accumulator in fp32.
"""

from __future__ import annotations

import math

import torch

from doge_cli.errors import DogeError

__all__ = ["LossWorkspace", "linear_cross_entropy", "linear_logprobs"]

# Logits held per chunk (fp32): 2**24 values = 64 MiB, e.g. 512 tokens of a 32k vocabulary. Larger
# chunks were no faster on CPU (the three products per chunk dominate) and cost memory.
CHUNK_LOGITS = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's logits stay near ``CHUNK_LOGITS`` values (64..4096)."""
    return max(64, min(4096, 2 ** int(math.log2(max(CHUNK_LOGITS // max(vocab_size, 1), 1)))))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's if it is on for this device, else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _accumulator(hidden: torch.Tensor) -> torch.dtype:
    """fp32 sums for fp32 and lower inputs; fp64 inputs keep fp64 throughout."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise DogeError(
            f"linear_cross_entropy expects hidden (N, D), weight (V, D), targets (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}: flatten the batch first"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise DogeError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}: hidden[1] must equal weight[1] and hidden[0] targets[0]"
        )
    if chunk_size < 1:
        raise DogeError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def _accumulate_outer(acc: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32) += grad.T @ h, in place when the dtypes allow it."""
    if grad.dtype == acc.dtype:
        acc.addmm_(grad.t(), h)
    else:
        acc.add_(grad.t() @ h)


class LossWorkspace:
    """Chunk-sized buffers the loss reuses across chunks and calls (one set, for the latest shape).

    Allocating them anew for every chunk is what made the CPU loss slow: a 512 x 32768 fp32 chunk is
    64 MiB, above glibc's mmap threshold, so every new one arrived as fresh pages the kernel faults in
    and zeroes (converting a bf16 chunk to fp32 took 21 ms into a new tensor, 3 ms into a reused one,
    on the 2-core dev machine). The buffers exist at the loss's peak anyway, so keeping them between
    steps does not raise peak memory. The caller owns one (a training objective keeps one for its run)
    and passes it to :func:`linear_cross_entropy`; without one, each call allocates its own.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, rows: int, hidden: torch.Tensor, weight: torch.Tensor, need_grad: bool) -> dict[str, torch.Tensor]:
        vocab, dim = weight.shape
        key = (hidden.device, hidden.dtype, rows, vocab, dim, need_grad)
        if self.key != key:
            self.release()  # drop the old set before allocating the new one
            new = {"fp32": torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)}
            if hidden.dtype != torch.float32:
                new["logits"] = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
                if need_grad:  # the low-dtype gradient reuses "logits" (free once converted to fp32)
                    new["outer"] = torch.empty(vocab, dim, dtype=hidden.dtype, device=hidden.device)
            self.key, self.buffers = key, new
        return self.buffers

    def release(self) -> None:
        """Free the buffers (they are rebuilt on the next call)."""
        self.key, self.buffers = None, {}


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over valid tokens; gradients are computed during the forward pass.

    Computing them in the forward costs three products per chunk (logits, d(hidden), d(weight))
    instead of four for a recompute-in-backward design; the price is that they are computed even
    when the caller never calls backward, so this path is taken only when a gradient is wanted.
    """

    @staticmethod
    def forward(ctx, hidden, master_weight, targets, ignore_index, chunk_size, need_grad, workspace):
        # The weight is cast here, not by the caller, so its gradient leaves as the fp32 accumulator
        # itself (no round trip through the compute dtype and back, as autocast's cast would make).
        weight = master_weight.to(hidden.dtype)
        n = hidden.shape[0]
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dhidden = torch.empty_like(hidden) if need_grad else None
        # fp32 accumulator: summing many bf16 chunk products in bf16 would lose the small ones.
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        ws = (workspace or LossWorkspace()).get(min(chunk_size, n), hidden, weight, need_grad)
        low = hidden.dtype != torch.float32
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            t = safe_targets[start:end]
            v = valid[start:end]
            logits = ws["fp32"][: end - start]
            if low:  # the product in the low dtype, then one conversion into the reused fp32 buffer
                logits.copy_(torch.mm(h, weight.t(), out=ws["logits"][: end - start]))
            else:
                torch.mm(h, weight.t(), out=logits)
            # One pass of exp over the chunk serves both the loss and the softmax gradient:
            # shift by the row max in place, exponentiate in place, normalise by the row sum.
            # (torch.softmax with an fp32 upcast measured no faster here.)
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_shifted = logits.gather(1, t[:, None]).squeeze(1)
            probs = logits.exp_()
            total = probs.sum(dim=-1)
            loss += torch.where(v, total.log() - target_shifted, 0.0).sum()
            if need_grad:
                # d(sum CE)/d(logits) = softmax - onehot on valid rows, 0 on ignored rows.
                # Normalising and zeroing ignored rows share one pass over the chunk.
                keep = v.to(total.dtype)
                grad = probs.mul_((keep / total)[:, None])
                grad.scatter_add_(1, t[:, None], -keep[:, None])
                if low:
                    grad = ws["logits"][: end - start].copy_(grad)
                    torch.mm(grad, weight, out=dhidden[start:end])
                    dweight.add_(torch.mm(grad.t(), h, out=ws["outer"]))
                else:
                    torch.mm(grad, weight, out=dhidden[start:end])
                    dweight.addmm_(grad.t(), h)
        if need_grad:
            ctx.save_for_backward(dhidden, dweight)
            ctx.weight_dtype = master_weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight = ctx.saved_tensors
        dh = dhidden * grad_loss.to(dhidden.dtype)
        dw = (dweight * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    workspace: LossWorkspace | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without the full logits.

    Args:
        hidden: (N, D) final hidden states (already normed), any float dtype.
        weight: (V, D) output embedding (``lm_head.weight``).
        targets: (N,) token ids; positions equal to ``ignore_index`` add nothing.
        reduction: ``"mean"`` over non-ignored tokens, or ``"sum"`` so a trainer can normalise
            by the target tokens of a whole accumulated batch itself. With every token ignored,
            ``"mean"`` returns 0 (``F.cross_entropy`` returns NaN), so an empty micro-batch
            cannot poison the gradients.
        chunk_size: tokens per chunk (default: ``default_chunk_size(V)``, ~64 MiB of fp32 logits);
            peak extra memory is about ``chunk_size * V * 4`` bytes x 2.
        workspace: chunk buffers to reuse across calls (:class:`LossWorkspace`); a training loop passes
            the one it keeps, so every step reuses the same memory.

    Returns:
        A scalar fp32 loss, differentiable with respect to ``hidden`` and ``weight``.
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    _check(hidden, weight, targets, chunk_size)
    if reduction not in ("mean", "sum"):
        raise DogeError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = _compute_dtype(hidden, weight)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        # hidden is cast outside the Function (autograd carries its gradient back to the caller's
        # dtype); the weight inside it, so the weight gradient is the fp32 accumulator itself.
        loss = _LinearCrossEntropy.apply(hidden.to(dtype), weight, targets, ignore_index, chunk_size, need_grad,
                                         workspace)
    if reduction == "mean":
        count = (targets != ignore_index).sum().clamp(min=1)
        loss = loss / count
    return loss


class _LinearLogprobs(torch.autograd.Function):
    """Per-token log p(target); the backward recomputes each chunk's logits from the saved lse.

    Unlike the loss, the upstream gradient here is a vector (one weight per token, e.g. a DPO or
    GRPO advantage), unknown at forward time, so the gradient cannot be folded into the forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, temperature):
        n = hidden.shape[0]
        acc = _accumulator(hidden)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        logprobs = torch.zeros(n, dtype=acc, device=hidden.device)
        lses = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = (hidden[start:end] @ weight.t()).to(acc) / temperature
            lse = torch.logsumexp(logits, dim=-1)
            lses[start:end] = lse
            target_logit = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            logprobs[start:end] = torch.where(valid[start:end], target_logit - lse, 0.0)
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lses)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, valid, lses = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _accumulator(hidden)
        dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        g_all = torch.where(valid, grad_logprobs.to(acc), 0.0) / temperature
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            g = g_all[start:end]
            logits = (h @ weight.t()).to(acc) / temperature
            # d logp / d logits = onehot - softmax, times the upstream weight of each token.
            grad = logits.sub_(lses[start:end, None]).exp_().mul_(-g[:, None])
            grad.scatter_add_(1, targets[start:end, None], g[:, None])
            grad = grad.to(hidden.dtype)
            if dhidden is not None:
                dhidden[start:end] = grad @ weight
            if ctx.needs_input_grad[1]:
                _accumulate_outer(dweight, grad, h)
        dw = dweight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dhidden, dw, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities ``log softmax(hidden @ weight.T / temperature)[target]``.

    For DPO and GRPO, which need log p(token) of sequences, not a mean loss. Differentiable with
    respect to ``hidden`` and ``weight``; never holds more than ``chunk_size x V`` logits.
    Positions whose target is ``ignore_index`` get 0 and no gradient.

    Returns:
        (N,) fp32 log-probabilities (fp64 for fp64 inputs, so oracle comparisons can run in fp64).
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    _check(hidden, weight, targets, chunk_size)
    if temperature <= 0:
        raise DogeError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearLogprobs.apply(
            hidden.to(dtype), weight.to(dtype), targets, ignore_index, chunk_size, float(temperature)
        )
