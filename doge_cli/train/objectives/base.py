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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from doge_cli.config.schema import StageConfig
from doge_cli.errors import DogeError


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of the per-target losses of this micro-batch (differentiable)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-micro-batch sums to log (detached); divided by the logging window's targets."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-micro-batch values to log as their mean over the window's micro-batches (e.g. rewards)."""


class Objective:
    """Base class of a stage. Subclasses set ``stage`` and implement the abstract methods."""

    stage = "base"
    steps_per_batch = 1
    """Optimizer steps trained on each batch of rows; the data advances once per batch (GRPO's
    ``num_iterations`` reuses one batch of rollouts for several steps)."""

    def __init__(self, config: StageConfig):
        self.config = config
        self.step = 0
        """Optimizer steps completed before the one being prepared (set by the core; exact on resume)."""
        self.tokenizer = None
        self.train_data = None
        self.eval_data = None

    # -- data ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load datasets (``self.train_data``, ``self.eval_data``) and the tokenizer."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of loss units in a micro-batch (tokens for LM losses, pairs for DPO)."""
        raise NotImplementedError

    # -- model --------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def after_prepare(self, model: torch.nn.Module, accelerator) -> None:
        """Hook after accelerate wrapped the model (e.g. build a reference model)."""

    # -- per step -----------------------------------------------------------------------
    def prepare_step(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Transform the micro-batches of one optimizer step before any loss (GRPO rollouts)."""
        return batches

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def eval_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        return self.loss(model, batch)

    def flops_per_target(self) -> float | None:
        """Training FLOPs per target unit, for MFU; None when not meaningful."""
        return None


def load_dataset_dict(path: str, stage: str):
    """Open a dataset folder written by ``doge data merge`` with a one-line error when it is not there."""
    from datasets import DatasetDict, load_from_disk

    p = Path(path)
    hint = (f"make it with 'doge data download --recipe quickstart && doge data tokenize ... && "
            f"doge data merge --stage {stage}' or set data.path")
    if not p.exists():
        raise DogeError(f"no dataset at {p}; {hint}")
    try:
        data = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise DogeError(f"{p} is not a saved dataset ({type(err).__name__}); {hint}") from None
    made_for = _stage_of(p)
    accepted = {"sft": ("sft", "r1")}.get(stage, (stage,))
    if made_for is not None and made_for not in accepted:
        raise DogeError(f"dataset {p} was made for stage {made_for} ('doge data merge --stage {made_for}'), not for "
                        f"{stage}; point data.path at the merged {stage} data (e.g. ./datasets/merged/{stage})")
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    if "train" not in data or len(data["train"]) == 0:
        raise DogeError(f"dataset {p} has no (or an empty) train split; {hint}")
    return data


def _stage_of(path: Path) -> str | None:
    """The stage ``doge data merge`` recorded for a dataset folder, if any."""
    from doge_cli.io import read_json_object

    manifest = read_json_object(path / "manifest.json") if (path / "manifest.json").is_file() else None
    stage = (manifest or {}).get("stage")
    return stage if isinstance(stage, str) else None


def load_tokenizer(path_or_id: str | None, fallback_dirs: list[Path]):
    """The tokenizer named by the config, else the first folder in ``fallback_dirs`` that has one, loaded
    by the one tokenizer loader (``doge_cli.data.tokenizer.load_tokenizer``)."""
    from doge_cli.data.tokenizer import load_tokenizer as load

    candidates = [path_or_id] if path_or_id else [str(d) for d in fallback_dirs if (Path(d) / "tokenizer_config.json").exists()]
    if not candidates:
        raise DogeError("no tokenizer found; set data.tokenizer=PATH (a folder from 'doge data train-tokenizer') "
                        "or tokenize the data with 'doge data tokenize', which records it")
    return load(candidates[0])
