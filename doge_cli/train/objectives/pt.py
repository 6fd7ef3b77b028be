"""Pretraining: next-token prediction on packed blocks of documents.

Rows hold ``input_ids`` and ``position_ids`` (positions restart at 0 where a document starts;
the model derives document masking from them). The target of a token is the next token of the
same document: the first token of the next document is never predicted from the previous one,
and padding (``attention_mask`` 0, when present) is never a target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from doge_cli.chat_format import config_eos
from doge_cli.errors import DogeError
from doge_cli.train.objectives.base import LossOutput, Objective
from doge_cli.train.objectives.lm import causal_lm_loss_sum, next_token_labels, padding_targets
from doge_cli.train.objectives.loading import (
    load_splits,
    load_tokenizer,
    tokenizer_from_manifest,
)


class PretrainObjective(Objective):
    stage = "pt"

    def setup(self) -> None:
        cfg = self.config
        self.train_data, self.eval_data = load_splits(cfg, ("input_ids",), "pretraining needs packed token blocks",
                                                      start_model=False)
        recorded = tokenizer_from_manifest(cfg.data.path)
        init_dirs = [Path(cfg.init_from)] if cfg.init_from else []
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or recorded, init_dirs)
        tok = self.tokenizer
        if "position_ids" not in self.train_data.column_names and tok.pad_token_id == tok.eos_token_id:
            raise DogeError(f"dataset {cfg.data.path} has no position_ids and the tokenizer's pad token is its EOS "
                            "token, so padding cannot be told from ends of documents; re-tokenize it with "
                            "'doge data tokenize --stage pt'")
        length = len(self.train_data[0]["input_ids"])
        if length != cfg.data.max_length:
            raise DogeError(f"dataset {cfg.data.path} holds {length}-token blocks but data.max_length is "
                            f"{cfg.data.max_length}; set data.max_length={length} or re-tokenize with --max-length")

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Rows hold numpy arrays (merged block index) or lists (a DatasetDict): one stacked array either way.
        batch = {k: torch.from_numpy(np.stack([np.asarray(r[k], dtype=np.int64) for r in rows]))
                 for k in ("input_ids", "position_ids", "attention_mask") if k in rows[0]}
        labels = next_token_labels(batch["input_ids"], batch.get("position_ids"), batch.get("attention_mask"))
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        if pad is not None:
            labels[padding_targets(batch["input_ids"], batch.get("position_ids"), pad)] = -100
        batch["labels"] = labels
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    def build_model(self):
        from doge_cli.model import DogeForCausalLM, load_model

        cfg = self.config
        vocab = len(self.tokenizer)
        if cfg.init_from:
            model = load_model(cfg.init_from, attn_implementation=cfg.runtime.attn_implementation, allow_legacy=False,
                               dtype=torch.float32)  # fp32 master weights; autocast gives the mixed precision
            if model.config.vocab_size < vocab:
                raise DogeError(f"the tokenizer has {vocab} tokens but model {cfg.init_from} has a vocabulary of "
                                f"{model.config.vocab_size}; use the tokenizer the model was trained with")
        else:
            model = DogeForCausalLM(self.hf_config(), attn_implementation=cfg.runtime.attn_implementation)
        self.model_config = model.config
        return model

    def hf_config(self):
        """The DogeConfig of a fresh model: the config's shape with the tokenizer's vocabulary and ids."""
        from transformers import DogeConfig

        tok = self.tokenizer
        fields = self.config.model.to_hf_dict()
        fields["vocab_size"] = len(tok)
        fields.update(bos_token_id=tok.bos_token_id, eos_token_id=config_eos(tok), pad_token_id=tok.pad_token_id)
        return DogeConfig(**fields)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossOutput:
        return causal_lm_loss_sum(model, batch, batch["labels"], self.loss_workspace)

    def flops_per_target(self) -> float | None:
        from doge_cli.model import training_flops_per_token

        config = getattr(self, "model_config", None) or self.hf_config()
        return float(training_flops_per_token(config, self.config.data.max_length))
