"""Fused kernels: dynamic-mask attention (Triton) and linear cross-entropy (chunked PyTorch).

Triton is imported lazily, so ``import doge_cli.kernels`` works on machines without it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_available", "probe", "unavailable_reason"]

_FAILED: dict[str, str] = {}  # device -> why the kernel failed to compile or run there (see probe)
_PROBED: dict[tuple, str | None] = {}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton dynamic-mask attention kernel cannot run for tensors on ``device``; None when it can.

    The one source of truth for the ``triton`` backend. It runs on CUDA GPUs of compute capability 8.0
    or newer (Ampere+, needed for bf16 tensor-core dots) with triton installed, and on CPU only under
    triton's interpreter (``TRITON_INTERPRET=1``, which the tests set).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not _triton_importable():
            return "the triton package is not installed (pip install 'triton>=3.9,<3.10')"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        if capability < (8, 0):
            return f"the GPU has compute capability {capability[0]}.{capability[1]}; the kernel needs 8.0 (Ampere) or newer"
        return _FAILED.get(str(torch.device("cuda", index)))
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "on a CPU the kernel runs only under triton's interpreter (TRITON_INTERPRET=1), which is for tests"
        if not _triton_importable():
            return "the triton package is not installed"
        return None
    return f"there is no Triton kernel for {device.type} devices"


def is_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel can run for tensors on ``device`` (see :func:`unavailable_reason`)."""
    return unavailable_reason(device) is None


def probe(device: torch.device | str, head_dim: int, dtype: torch.dtype) -> str | None:
    """Compile and run the kernel's forward and backward once on a CUDA ``device`` at a small shape with
    this head dim and dtype; None when they ran, else why not (and :func:`unavailable_reason` reports
    that reason for the device from then on, so ``auto`` passes the kernel over). Done once per (device,
    head dim, dtype). A compile or launch error on a real card (an unsupported instruction, a resource
    limit no configuration met) is thus found before any work starts rather than at the first step."""
    device = torch.device(device)
    if device.type != "cuda":
        return unavailable_reason(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), head_dim, dtype)
    if key in _PROBED:
        return _PROBED[key]
    reason = unavailable_reason(device)
    if reason is None:
        try:
            _run_once(device, head_dim, dtype)
        except Exception as err:  # whatever stops the kernel on this card is reported, then avoided
            detail = " ".join(str(err).split())[:300] or "no message"
            reason = (f"the kernel failed to compile or run at head dim {head_dim}, "
                      f"{str(dtype).removeprefix('torch.')} ({type(err).__name__}: {detail})")
            _FAILED[str(device)] = reason
    _PROBED[key] = reason
    return reason


def _run_once(device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """The kernel's forward and backward on small random inputs (the probe's work). Gradients are on and
    autocast off whatever the caller's context (a model's first forward may run under no_grad, inference
    mode or autocast)."""
    from doge_cli.kernels.dma_attention import dma_attention

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 2, 128, head_dim, device=device, dtype=dtype, generator=generator,
                               requires_grad=True) for _ in range(3))
        bias = torch.rand(1, 2, 128, device=device, dtype=dtype, generator=generator, requires_grad=True)
        out = dma_attention(q, k, v, bias, scale=head_dim**-0.5)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
