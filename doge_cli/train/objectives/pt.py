"""Pretraining: next-token prediction on packed blocks of documents.

Rows hold ``input_ids`` and ``position_ids`` (positions restart at 0 where a document starts;
the model derives document masking from them). The target of a token is the next token of the
same document: the first token of the next document is never predicted from the previous one,
and padding (``attention_mask`` 0, when present) is never a target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from doge_cli.chat_format import config_eos
from doge_cli.errors import DogeError
from doge_cli.train.objectives.base import LossOutput, Objective, load_dataset_dict, load_tokenizer


def tokenizer_from_manifest(data_path: str) -> str | None:
    """The tokenizer that ``doge data`` recorded for a dataset folder, if any."""
    manifest = Path(data_path) / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer")
        except json.JSONDecodeError:
            return None
    return None


def next_token_labels(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``labels[t] = input_ids[t + 1]`` within a document, else -100 (already shifted)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    if position_ids is not None:
        labels[:, :-1][position_ids[:, 1:] == 0] = -100
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = -100
        labels[attention_mask == 0] = -100
    return labels


def padding_targets(input_ids: torch.Tensor, position_ids: torch.Tensor | None, pad_id: int) -> torch.Tensor:
    """Bool (B, T): targets (``labels[t]``, the token after ``t``) that belong to the packer's padding.

    The packer fills the end of a source's last block with the pad token as a document of its own
    (positions restart at 0 where it starts), so with ``position_ids`` the padding is the row's last
    document when it holds nothing but pad tokens: found by position, not by the pad id alone, so a
    tokenizer whose pad token is also its EOS keeps every real end-of-document target (the target
    entering the padding is already cut by the document boundary). Without ``position_ids`` a row is
    one document and its trailing run of pad tokens is the padding, entry target included.
    """
    _, t = input_ids.shape
    cols = torch.arange(t, device=input_ids.device)
    if position_ids is None:
        run = (input_ids == pad_id).flip(-1).cumprod(-1).flip(-1).bool()
        entering = torch.zeros_like(run)
        entering[:, :-1] = run[:, 1:]
        return run | entering
    starts = position_ids == 0
    last_start = torch.where(starts, cols, torch.zeros_like(cols)).amax(-1, keepdim=True)
    tail = cols[None] >= last_start
    return tail & ((input_ids == pad_id) | ~tail).all(-1, keepdim=True)


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
    """Sum of next-token cross-entropies, through the fused linear cross-entropy (no full logits).

    Under DeepSpeed ZeRO-3 and FSDP the head's weight is only whole inside the model's forward, so
    there the model computes the logits itself and the loss is a plain cross-entropy.
    """
    from doge_cli.kernels.linear_cross_entropy import linear_cross_entropy

    head = _unwrap(model).lm_head.weight
    fused = head_is_whole(head)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        return_hidden_states=fused,
    )
    if fused:
        hidden = out.hidden_states
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, labels.reshape(-1), reduction="sum")
    else:
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    metrics = {}
    if out.aux_loss is not None:
        n = (labels != -100).sum()
        # The router loss is a per-token mean: weight it by the targets so normalisation keeps it a mean.
        loss = loss + out.aux_loss * n
        metrics["aux_loss"] = (out.aux_loss.detach() * n).float()
    return LossOutput(loss, metrics)


def head_is_whole(weight: torch.Tensor) -> bool:
    """False for a sharded LM head (DeepSpeed ZeRO-3 partitions carry ``ds_id``; FSDP2 shards are
    DTensors with a ``device_mesh``): only the model's own forward sees those weights whole."""
    return not hasattr(weight, "ds_id") and not hasattr(weight, "device_mesh")


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class PretrainObjective(Objective):
    stage = "pt"

    def setup(self) -> None:
        cfg = self.config
        data = load_dataset_dict(cfg.data.path, "pt")
        self.train_data = data["train"]
        self.eval_data = data.get(cfg.data.eval_split)
        for name in ("input_ids",):
            if name not in self.train_data.column_names:
                raise DogeError(f"dataset {cfg.data.path} has no '{name}' column (columns: "
                                f"{', '.join(self.train_data.column_names)}); build it with 'doge data tokenize --stage pt'")
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
        batch = {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}
        if "position_ids" in rows[0]:
            batch["position_ids"] = torch.tensor([r["position_ids"] for r in rows], dtype=torch.long)
        if "attention_mask" in rows[0]:
            batch["attention_mask"] = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long)
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
        return causal_lm_loss_sum(model, batch, batch["labels"])

    def flops_per_target(self) -> float | None:
        from doge_cli.model import training_flops_per_token

        config = getattr(self, "model_config", None) or self.hf_config()
        return float(training_flops_per_token(config, self.config.data.max_length))
