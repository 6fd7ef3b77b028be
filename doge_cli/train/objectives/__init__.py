"""Stage objectives: how a stage builds batches and computes its loss on the shared core."""

from __future__ import annotations

import importlib

from doge_cli.config.schema import StageConfig
from doge_cli.train.objectives.base import LossOutput, Objective

# stage -> "module:class", imported on first use (each pulls in what it needs).
REGISTRY: dict[str, str] = {
    "pt": "doge_cli.train.objectives.pt:PretrainObjective",
    "sft": "doge_cli.train.objectives.sft:SFTObjective",
    "dpo": "doge_cli.train.objectives.dpo:DPOObjective",
    "grpo": "doge_cli.train.objectives.grpo:GRPOObjective",
}


def objective_for(config: StageConfig) -> Objective:
    """The objective of ``config.stage``."""
    module, _, name = REGISTRY[config.stage].partition(":")
    return getattr(importlib.import_module(module), name)(config)


__all__ = ["REGISTRY", "LossOutput", "Objective", "objective_for"]
