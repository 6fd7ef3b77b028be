"""Launch configurations of the dynamic-mask attention kernels, chosen per device from its real limits.

A Triton program keeps its tiles in shared memory, and a configuration that needs more than the card
has per block does not launch (``OutOfResources``). The limit differs a lot between the cards doge's
users train on: about 99 KB per block on an RTX 3090/4090 (sm_86/sm_89), 163 KB on an A100 (sm_80),
227 KB on an H100/H200 (sm_90). So each kernel has a short list of candidate configurations, fastest
first, and a device gets the first one whose estimated need (:func:`shared_memory_bytes`) fits its
limit. If a launch still runs out of resources, the kernel wrapper moves to the next candidate and
says so once in the log (``doge_cli.kernels._dma_triton``).

This module needs neither triton nor a GPU: it is plain arithmetic over the device's properties, so the
choice is tested on CPU with the properties of each card (tests/kernels/test_launch.py).

The estimate, in bytes, with ``e`` the element size of q/k/v (2 for bf16/fp16, 4 for fp32), ``D`` the
head dim rounded up to a power of two (at least 16), ``S`` the pipeline stages, ``M``/``N`` the query and
key block sizes:

- forward: the query tile stays (``e·M·D``); each stage buffers a key and a value tile and the keys'
  fp32 bias (``S·(2·e·N·D + 4·N)``); the probabilities are staged for the second product (``e·M·N``).
- backward, dk/dv kernel: the key and value tiles stay (``2·e·N·D``); each stage buffers a query and an
  output-gradient tile and their fp32 log-sum-exp and delta (``S·(2·e·M·D + 8·M)``); the probabilities
  and score gradients are staged (``2·e·M·N``).
- backward, dq kernel: the query and output-gradient tiles stay (``2·e·M·D``); each stage buffers a key
  and a value tile and their bias (``S·(2·e·N·D + 4·N)``); the score gradients are staged (``e·M·N``).

One configuration serves both backward kernels, so its need is the larger of the two. The estimate
counts every tile Triton may place in shared memory, so it errs on the side of a smaller configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("forward", "backward")


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def kwargs(self, head_dim: int) -> dict:
        """The keyword arguments a kernel launch takes."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": block_d(head_dim),
                "num_warps": self.num_warps, "num_stages": self.num_stages}


# Fastest first (larger tiles and deeper pipelines where they fit); the last ones fit any card.
CANDIDATES: dict[str, tuple[LaunchConfig, ...]] = {
    "forward": (LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 3),
                LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 32, 4, 1),
                LaunchConfig(16, 16, 2, 1)),
    "backward": (LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 64, 4, 1), LaunchConfig(64, 32, 4, 2),
                 LaunchConfig(32, 32, 4, 1), LaunchConfig(16, 16, 2, 1)),
}
INTERPRETER = LaunchConfig(16, 16, 1, 1)  # under TRITON_INTERPRET each program is slow Python: small tiles

# Shared memory per block (opt-in maximum, bytes) by compute capability, for torch builds whose device
# properties do not report it. Unknown capabilities get the smallest of these.
SHARED_MEMORY_BY_CAPABILITY = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
                               (10, 0): 232448, (12, 0): 101376}


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of two, at least 16 (tensor-core dots need 16)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def element_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def shared_memory_bytes(kind: str, config: LaunchConfig, head_dim: int, dtype: torch.dtype) -> int:
    """Estimated shared memory of one program of ``kind`` (see the module docstring for the formula)."""
    e, d, s = element_bytes(dtype), block_d(head_dim), config.num_stages
    m, n = config.block_m, config.block_n
    if kind == "forward":
        return e * m * d + s * (2 * e * n * d + 4 * n) + e * m * n
    if kind == "backward":
        dkdv = 2 * e * n * d + s * (2 * e * m * d + 8 * m) + 2 * e * m * n
        dq = 2 * e * m * d + s * (2 * e * n * d + 4 * n) + e * m * n
        return max(dkdv, dq)
    raise ValueError(f"unknown kernel kind {kind!r}; choose one of {KINDS}")


def shared_memory_limit(properties) -> int:
    """Shared memory one block may use on a device (``torch.cuda.get_device_properties``)."""
    reported = getattr(properties, "shared_memory_per_block_optin", None)
    if reported:
        return int(reported)
    capability = (properties.major, properties.minor)
    return SHARED_MEMORY_BY_CAPABILITY.get(capability, min(SHARED_MEMORY_BY_CAPABILITY.values()))


def candidates_that_fit(kind: str, head_dim: int, dtype: torch.dtype, limit: int) -> list[LaunchConfig]:
    """The candidates of ``kind`` whose estimated need fits ``limit`` bytes, fastest first."""
    return [c for c in CANDIDATES[kind] if shared_memory_bytes(kind, c, head_dim, dtype) <= limit]


def choose(kind: str, head_dim: int, dtype: torch.dtype, properties) -> list[LaunchConfig]:
    """The configurations to try on a device, in order: the fitting candidates, fastest first (the kernel
    wrapper moves down the list if a launch still runs out of resources). Never empty: the smallest
    candidate fits every card the kernel supports; should it not, it is tried anyway and its launch
    error is the one reported."""
    fitting = candidates_that_fit(kind, head_dim, dtype, shared_memory_limit(properties))
    return fitting or [CANDIDATES[kind][-1]]
