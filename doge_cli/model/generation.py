"""Token generation with a KV cache: greedy or sampled, batched with left padding, streamed.

A lean loop of our own rather than transformers' ``generate``: it drives our
:class:`~doge_cli.model.DogeForCausalLM` directly and, on the 13M Doge-20M shape on the 2-core CPU,
was faster than transformers' generate on the native model (benchmarks/RESULTS.md, "Model step").
Greedy output matches transformers' generate token for token (tests/model/test_generation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from doge_cli.chat_format import config_eos_ids


@dataclass
class GenerationOutput:
    """``sequences`` (B * num_return_sequences, prompt + new) with ``pad_token_id`` after a stop;
    ``lengths`` (rows,) new tokens per row including the stop token; ``prompt_length`` columns of prompt."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    prompt_length: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, eq. 1 as transformers applies it): seen tokens' logits are
    divided by ``penalty`` when positive and multiplied when negative. ``seen`` (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020); the rest become -inf. At least one token survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the first token always has mass_before = 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    num_return_sequences: int = 1,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    stop_together: Callable[[bool], bool] | None = None,
) -> GenerationOutput:
    """Continue each prompt row of ``input_ids`` (B, T), left-padded where ``attention_mask`` is 0.

    Greedy unless ``do_sample``; sampling applies repetition penalty, temperature, top-k, top-p in
    that order (transformers' order). A row stops after emitting any of ``stop_token_ids`` (default:
    the config's eos ids). ``num_return_sequences`` samples per prompt are adjacent rows (GRPO groups).
    ``on_token(step, tokens)`` is called with each step's (rows,) new tokens (pad for finished rows).
    ``stop_together(done)`` turns this process's "all rows done" into the decision of every process
    (see ``doge_cli.train.collective``): where weights are gathered inside each forward, a process
    whose rows are done keeps stepping (its rows only emit padding) until all processes are done.
    """
    config = model.config
    if stop_token_ids is None:
        stop_token_ids = config_eos_ids(config)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (list(stop_token_ids) or [0])[0]
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device).long()
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
    rows, prompt_length = input_ids.shape
    stops = torch.tensor(list(stop_token_ids), device=device, dtype=torch.long)

    # Positions count real tokens only (left padding shifts nothing); pads get 1, never a document start.
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(rows, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, attention_mask.bool())
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1].float()

    tokens = []
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if do_sample:
            logits = filter_top_k_top_p(logits / max(temperature, 1e-6), top_k, top_p)
            next_tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)
        tokens.append(next_tokens)
        lengths += (~finished).long()
        if seen is not None:
            seen.scatter_(1, next_tokens[:, None], (~finished)[:, None])
        finished |= torch.isin(next_tokens, stops)
        if on_token is not None:
            on_token(step, next_tokens)
        done = bool(finished.all())
        if stop_together is not None:
            done = stop_together(done)
        if step == max_new_tokens - 1 or done:
            break
        attention_mask = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    new = torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(rows, 0)
    return GenerationOutput(torch.cat((input_ids, new), dim=1), lengths, prompt_length)
