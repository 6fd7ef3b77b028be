"""Stage objectives: how a stage builds batches and computes its loss on the shared core."""

from __future__ import annotations

from doge_cli.config.schema import StageConfig
from doge_cli.train.objectives.base import LossOutput, Objective


def objective_for(config: StageConfig) -> Objective:
    """The objective of ``config.stage`` (imported lazily: each pulls in what it needs)."""
    if config.stage == "pt":
        from doge_cli.train.objectives.pt import PretrainObjective

        return PretrainObjective(config)
    if config.stage == "sft":
        from doge_cli.train.objectives.sft import SFTObjective

        return SFTObjective(config)
    if config.stage == "dpo":
        from doge_cli.train.objectives.dpo import DPOObjective

        return DPOObjective(config)
    if config.stage == "grpo":
        from doge_cli.train.objectives.grpo import GRPOObjective

        return GRPOObjective(config)
    raise ValueError(f"unknown stage {config.stage!r}; choose pt, sft, dpo or grpo")


__all__ = ["LossOutput", "Objective", "objective_for"]
