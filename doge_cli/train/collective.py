"""What the processes of a distributed run must do together.

DeepSpeed ZeRO-3 and FSDP keep each weight in pieces across processes and gather it inside every
forward pass, collectively: every process must run the same number of forwards, or the ones that
stop early leave the others waiting for ever. Generation (GRPO rollouts, samples) therefore stops
only when every process is done, and evaluation gives every process the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gathers_weights_in_forward(acc) -> bool:
    """True under DeepSpeed ZeRO-3 and FSDP: forwards are collective operations."""
    from accelerate.utils import DistributedType

    if acc.num_processes == 1:
        return False
    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


def stop_together(acc) -> Callable[[bool], bool] | None:
    """For ``generate(stop_together=...)``: True once every process is done, where forwards are
    collective; None (each process stops on its own) everywhere else."""
    if not gathers_weights_in_forward(acc):
        return None

    def all_done(done: bool) -> bool:
        pending = torch.tensor(0.0 if done else 1.0, device=acc.device)
        return float(acc.reduce(pending, reduction="sum")) == 0.0

    return all_done
