"""Supervised fine-tuning on chat conversations: the loss is on assistant tokens only.

Rows come from ``doge data tokenize --stage sft`` (or ``r1``): ``input_ids``, ``labels`` and
``position_ids``. ``labels`` are *not* shifted: ``labels[t]`` is the token at position ``t`` when
it belongs to an assistant reply (reply text and its end-of-turn token), else -100; the model
predicts it from position ``t - 1``. Rows may already hold several conversations (tokenized with
``--pack``): ``position_ids`` restart at 0 at each one, and the model turns those restarts into
document masks, so attention never crosses conversations.

``packing: true`` concatenates the micro-batch's rows into one padding-free row (positions keep
restarting per conversation); ``packing: false`` right-pads them instead. Either way one dataset
row counts as one sequence of ``train.global_batch_size``, and the loss is the mean over all
assistant tokens of the optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from doge_cli.errors import DogeError
from doge_cli.train.objectives.base import LossOutput, Objective
from doge_cli.train.objectives.lm import causal_lm_loss_sum
from doge_cli.train.objectives.loading import (
    chat_tokenizer,
    load_splits,
    load_start_model,
)

REQUIRED = ("input_ids", "labels")


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Targets per position: ``out[t] = labels[t + 1]`` unless ``t + 1`` starts a new conversation."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        out[:, :-1][position_ids[:, 1:] == 0] = -100
    return out


def rows_without_targets(split) -> list[int]:
    """Indices of rows whose labels are all -100 (a conversation with no assistant turn), via Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = split.data.column("labels").combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # pragma: no cover - combine_chunks returns an array
        column = column.chunk(0)
    flat = pc.list_flatten(column)
    parents = pc.list_parent_indices(column)
    with_target = pc.unique(pc.filter(parents, pc.not_equal(flat, -100)))
    if len(with_target) == len(split):
        return []
    found = set(with_target.to_pylist())
    if split._indices is not None:  # a selected/shuffled view: map back to the rows a user sees
        order = split._indices.column(0).to_pylist()
        return [i for i, j in enumerate(order) if j not in found]
    return [i for i in range(len(split)) if i not in found]


class SFTObjective(Objective):
    stage = "sft"

    def setup(self) -> None:
        cfg = self.config
        self.train_data, self.eval_data = load_splits(cfg, REQUIRED, "SFT needs token ids and assistant labels",
                                                      start_model=True)
        self.tokenizer = chat_tokenizer(cfg)
        for name, split in {"train": self.train_data, cfg.data.eval_split: self.eval_data}.items():
            if split is None:
                continue
            empty = rows_without_targets(split) if cfg.assistant_only_loss else []
            if empty:
                raise DogeError(f"row {empty[0]} of the {name} split of {cfg.data.path} has no assistant tokens "
                                f"({len(empty)} such rows): every conversation needs an assistant turn; drop them "
                                "or re-tokenize with 'doge data tokenize --stage sft'")

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        limit = self.config.data.max_length
        ids = [list(r["input_ids"])[:limit] for r in rows]
        if self.config.assistant_only_loss:
            labels = [list(r["labels"])[:limit] for r in rows]
        else:
            labels = [list(x) for x in ids]
        pos = [list(r["position_ids"])[:limit] if "position_ids" in r else list(range(len(x)))
               for r, x in zip(rows, ids)]
        if self.config.packing:
            # One padding-free row: each conversation's positions restart at 0, which is the document mask.
            batch = {"input_ids": torch.tensor([sum(ids, [])]), "position_ids": torch.tensor([sum(pos, [])])}
            lab = torch.tensor([sum(labels, [])])
        else:
            width = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id

            def padded(seqs, value):
                return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

            batch = {"input_ids": padded(ids, pad), "position_ids": padded(pos, 1),
                     "attention_mask": padded([[1] * len(x) for x in ids], 0)}
            lab = padded(labels, -100)
        batch["labels"] = shift_labels(lab, batch["position_ids"])
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    def build_model(self):
        model = load_start_model(self.config, self.tokenizer)
        self.model_config = model.config
        return model

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        return causal_lm_loss_sum(model, batch, batch["labels"], self.loss_workspace)

    def flops_per_target(self) -> float | None:
        from doge_cli.model import training_flops_per_token

        config = getattr(self, "model_config", None)
        return float(training_flops_per_token(config, self.config.data.max_length)) if config is not None else None
