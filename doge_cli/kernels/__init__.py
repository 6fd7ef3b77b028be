"""Fused kernels: dynamic-mask attention (Triton) and linear cross-entropy (chunked PyTorch).

Triton is imported lazily, so ``import doge_cli.kernels`` works on machines without it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_available"]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def is_available(device: torch.device | str) -> bool:
    """Whether the Triton dynamic-mask attention kernel can run for tensors on ``device``.

    True on CUDA GPUs of compute capability 8.0 or newer (Ampere+, needed for bf16 tensor-core
    dots) with triton installed, and on CPU when ``TRITON_INTERPRET=1`` is set (the interpreter,
    for tests). Elsewhere ``dma_attention`` falls back to the PyTorch reference.
    """
    device = torch.device(device)
    if not _triton_importable():
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False
