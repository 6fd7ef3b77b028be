"""Fused kernels: dynamic-mask attention (Triton) and linear cross-entropy (chunked PyTorch).

Triton is imported lazily, so ``import doge_cli.kernels`` works on machines without it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_available", "unavailable_reason"]


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
        return None
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
