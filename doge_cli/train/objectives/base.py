"""What a training stage supplies to the core: data, model, and a loss.

The core calls, in order: ``setup`` (datasets, tokenizer), ``build_model``, ``after_prepare``
(the model is wrapped by accelerate but still holds its *start* weights: a resumed run restores
its checkpoint only afterwards, so reference models built here are always the start model), then
per optimizer step ``prepare_step`` (GRPO generates its rollouts here) and, per micro-batch,
``loss``. Each row handed to ``collate`` carries its dataset index under ``"_row"``.
Losses are returned as **sums** over target units with the unit count beside them, so the core
can normalise by the number of targets across all micro-batches and processes: accumulating
1 × 8 then gives exactly the gradient of 8 × 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from doge_cli.config.schema import StageConfig
from doge_cli.kernels.linear_cross_entropy import LossWorkspace


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of the per-target losses of this micro-batch (differentiable)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-micro-batch sums to log (detached); divided by the logging window's targets."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-micro-batch values to log as their mean over the window's micro-batches (e.g. rewards)."""


class Objective(ABC):
    """The contract of a stage: subclasses set ``stage`` and implement the abstract methods."""

    stage: str = "base"
    steps_per_batch: int = 1
    """Optimizer steps trained on each batch of rows; the data advances once per batch (GRPO's
    ``num_iterations`` reuses one batch of rollouts for several steps)."""

    def __init__(self, config: StageConfig):
        self.config = config
        self.step = 0
        """Optimizer steps completed before the one being prepared (set by the core; exact on resume)."""
        self.tokenizer = None
        """The tokenizer saved with the final model (set by ``setup``)."""
        self.train_data = None
        """The training split (a ``datasets.Dataset``, set by ``setup``)."""
        self.eval_data = None
        """The evaluation split, or None (set by ``setup``)."""
        self.model_config = None
        """The DogeConfig of the model being trained (set by ``build_model``)."""
        self.loss_workspace = LossWorkspace()
        """Chunk buffers of the fused LM loss, reused by every step of the run."""

    # -- data ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Load datasets (``self.train_data``, ``self.eval_data``) and the tokenizer."""

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of the training (or eval) split into one micro-batch."""

    @abstractmethod
    def count_targets(self, batch: dict[str, Any]) -> int:
        """Number of loss units in a micro-batch (tokens for LM losses, pairs for DPO)."""

    # -- model --------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model to train, in fp32, with ``self.model_config`` set."""

    def after_prepare(self, model: torch.nn.Module, accelerator) -> None:  # noqa: B027 - an optional hook
        """Hook after accelerate wrapped the model (e.g. build a reference model)."""

    # -- per step -----------------------------------------------------------------------
    def prepare_step(self, model: torch.nn.Module, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Transform the micro-batches of one optimizer step before any loss (GRPO rollouts)."""
        return batches

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """The micro-batch's loss as a sum over its target units (see the module docstring)."""

    def eval_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        return self.loss(model, batch)

    def flops_per_target(self) -> float | None:
        """Training FLOPs per target unit, for MFU; None when not meaningful."""
        return None
