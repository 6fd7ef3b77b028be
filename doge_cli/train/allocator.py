"""Keep large CPU allocations in the process instead of handing them back to the OS every step.

glibc's malloc serves blocks above its mmap threshold (at most 32 MiB by default) with a fresh
``mmap`` and unmaps them on free. A CPU training step allocates the same large tensors every step
(a 512 x 32768 fp32 logits chunk is 64 MiB), so each one comes back as untouched pages that the
kernel faults in and zeroes again: measured on the 2-core dev machine, converting one bf16 logits
chunk to fp32 took 21 ms into a new tensor and 3 ms into a reused one. PyTorch's CPU performance
guide suggests preloading jemalloc or tcmalloc for this; doge gets the same effect without a preload
by raising glibc's mmap and trim thresholds (``mallopt``) when it trains on CPU, so freed blocks stay
in the heap and are reused. Peak memory is unchanged in practice (the blocks are reused, not
accumulated; see benchmarks/RESULTS.md). Set ``DOGE_KEEP_ALLOCATIONS=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
_TRIM_THRESHOLD = 2**31 - 1  # never shrink the heap top on free

_applied = False


def keep_large_allocations() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True if they are (now) raised.

    A no-op (False) off Linux, on a libc without ``mallopt`` (e.g. musl), or when the environment
    sets ``DOGE_KEEP_ALLOCATIONS=0``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("DOGE_KEEP_ALLOCATIONS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
