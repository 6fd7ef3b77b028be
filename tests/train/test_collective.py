"""Which launches make every forward collective, and stopping generation together."""

from types import SimpleNamespace

import torch
from accelerate.utils import DistributedType

from doge_cli.train.collective import gathers_weights_in_forward, stop_together


def _acc(kind, world=2, stage=None):
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}) if stage is not None else None
    return SimpleNamespace(num_processes=world, distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin),
                           device=torch.device("cpu"), reduce=lambda t, reduction: t * world)


def test_only_zero3_and_fsdp_gather_weights_in_forward():
    assert gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, stage=3))
    assert gathers_weights_in_forward(_acc(DistributedType.FSDP))
    assert not gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, stage=2))
    assert not gathers_weights_in_forward(_acc(DistributedType.MULTI_GPU))
    assert not gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, world=1, stage=3))
    assert stop_together(_acc(DistributedType.MULTI_GPU)) is None


def test_stop_together_waits_for_every_process():
    all_done = stop_together(_acc(DistributedType.DEEPSPEED, stage=3))
    assert all_done(True) is True  # the fake reduce counts this process twice: 0 pending
    assert all_done(False) is False
