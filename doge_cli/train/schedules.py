"""Learning-rate schedules as multipliers of the peak rate, one value per optimizer step."""

from __future__ import annotations

import math

from doge_cli.config.schema import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    - warmup_stable_decay (Hu et al. 2024, MiniCPM §4.1): linear warmup, constant, then a linear
      decay to ``min_lr_rate`` over the last ``decay_ratio`` of the steps. The long constant phase
      is what lets pretraining be continued on new data from any stable-phase checkpoint.
    - cosine_with_min_lr: linear warmup, then half a cosine from 1 down to ``min_lr_rate``.
    - constant_with_warmup: linear warmup, then 1.
    """
    total = max(total_steps, 1)
    warmup = int(round(schedule.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    floor = schedule.min_lr_rate
    if schedule.name == "constant_with_warmup":
        return 1.0
    if schedule.name == "warmup_stable_decay":
        decay = int(round(schedule.decay_ratio * total))
        decay_start = total - decay
        if step < decay_start or decay == 0:
            return 1.0
        progress = (step - decay_start + 1) / decay
        return floor + (1.0 - floor) * max(0.0, 1.0 - progress)
    # cosine_with_min_lr
    span = max(total - warmup, 1)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
