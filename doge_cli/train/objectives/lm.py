"""Language-model pieces every stage shares: shifted labels, padding, the causal-LM loss sum,
per-token log-probabilities through the fused head, and unwrapping a prepared model."""

from __future__ import annotations

import torch

from doge_cli.kernels.linear_cross_entropy import LossWorkspace, linear_cross_entropy
from doge_cli.train.objectives.base import LossOutput


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


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], labels: torch.Tensor,
                       workspace: LossWorkspace | None = None) -> LossOutput:
    """Sum of next-token cross-entropies, through the fused linear cross-entropy (no full logits).

    Under DeepSpeed ZeRO-3 and FSDP the head's weight is only whole inside the model's forward, so
    there the model computes the logits itself and the loss is a plain cross-entropy.
    """
    head = unwrap(model).lm_head.weight
    fused = head_is_whole(head)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        return_hidden_states=fused,
    )
    if fused:
        hidden = out.hidden_states
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, labels.reshape(-1), reduction="sum",
                                    workspace=workspace)
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


def unwrap(model):
    """The bare model inside accelerate's, DDP's, DeepSpeed's and torch.compile's wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


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

    head = unwrap(model).lm_head.weight
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
