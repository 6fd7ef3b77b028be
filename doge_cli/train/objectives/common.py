"""Pieces the post-training stages (SFT, DPO, GRPO) share: the chat tokenizer, the start model,
per-token log-probabilities of sequences, and padding."""

from __future__ import annotations

from pathlib import Path

import torch

from doge_cli.chat_format import config_eos
from doge_cli.errors import DogeError
from doge_cli.train.objectives.base import load_tokenizer
from doge_cli.train.objectives.pt import _unwrap, head_is_whole, tokenizer_from_manifest


def require_init_from(config) -> str:
    if not config.init_from:
        raise DogeError(f"{config.stage} needs a model to start from; pass --model PATH|HUB_ID (or set init_from "
                        "in the recipe), e.g. the final/ folder of the previous stage")
    return config.init_from


def chat_tokenizer(config):
    """The tokenizer saved with the final model: data.tokenizer, else the one ``doge data`` recorded,
    else the start model's. It must have a chat template, since chat and GRPO render prompts with it."""
    init = require_init_from(config)
    recorded = tokenizer_from_manifest(config.data.path)
    tok = load_tokenizer(config.data.tokenizer or recorded, [Path(init)])
    if not tok.chat_template:
        raise DogeError(f"the tokenizer of {config.stage} has no chat template; use one made by "
                        "'doge data train-tokenizer' (or set data.tokenizer to such a folder)")
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise DogeError("the tokenizer lacks a pad or an eos token; use one made by 'doge data train-tokenizer'")
    return tok


def load_start_model(config, tokenizer):
    """The model to fine-tune, with eos (incl. end-of-turn) and pad ids from the chat tokenizer so the
    exported generation_config stops after one reply."""
    from doge_cli.model import load_model

    init = require_init_from(config)
    # fp32 master weights whatever the checkpoint's dtype (hub models are often bf16): mixed precision
    # comes from autocast (runtime.precision), as in pretraining; bf16 weights would lose small updates.
    model = load_model(init, attn_implementation=config.runtime.attn_implementation, allow_legacy=False,
                       dtype=torch.float32)
    vocab = len(tokenizer)
    if model.config.vocab_size < vocab:
        raise DogeError(f"the tokenizer has {vocab} tokens but model {init} has a vocabulary of "
                        f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    model.config.eos_token_id = config_eos(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id
    return model.train()


def frozen_copy(model: torch.nn.Module, accelerator, instead: str) -> torch.nn.Module:
    """A reference model: the start weights, no gradients, eval mode, same device.

    Under ZeRO-3 or FSDP the prepared model holds only this process's shard of each weight, so a copy
    would be no model at all: refused in one line, naming the setting that needs no reference model.
    """
    import copy

    from doge_cli.train.collective import gathers_weights_in_forward

    if gathers_weights_in_forward(accelerator):
        raise DogeError(f"a frozen reference model is not supported under DeepSpeed ZeRO-3 or FSDP (each process "
                        f"holds only a shard of the weights); use {instead}, or ZeRO-2 / DDP")

    ref = copy.deepcopy(_unwrap(model))
    ref.requires_grad_(False)
    return ref.eval()


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: torch.Tensor,
                   position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                   start: int = 0) -> torch.Tensor:
    """log p(targets[:, t] | input_ids[:, :start + t + 1]) per position, 0 where the target is -100.

    ``targets`` (B, T') are already shifted: ``targets[:, t]`` is the token that follows position
    ``start + t``. Only those T' positions reach the head, through the fused linear log-probs (no
    full logits); under ZeRO-3 or FSDP the sharded head is only whole inside the forward, so there the
    model returns logits and a plain log-softmax is used.
    """
    from doge_cli.kernels.linear_cross_entropy import linear_logprobs

    head = _unwrap(model).lm_head.weight
    fused = head_is_whole(head)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                return_hidden_states=fused)
    width = targets.shape[1]
    if fused:
        hidden = out.hidden_states[:, start:start + width]
        flat = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), head, targets.reshape(-1),
                               temperature=temperature)
        return flat.view_as(targets)
    logits = out.logits[:, start:start + width].float() / temperature
    safe = targets.clamp(min=0)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return logps.masked_fill(targets == -100, 0.0)


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
