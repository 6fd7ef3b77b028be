"""``generate``: a batch of (left-padded) prompt rows continued through the engine, transformers-style.

A convenience for callers that hold prompts as one padded tensor (tests, benchmarks, scripts); it builds
one :class:`~doge_cli.inference.engine.Request` per row and returns the rows with their new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from doge_cli.inference.engine import Engine, Request
from doge_cli.inference.sampling import SamplingParams


@dataclass
class GenerationOutput:
    """``sequences`` (B * num_return_sequences, prompt + new) with ``pad_token_id`` after a stop;
    ``lengths`` (rows,) new tokens per row including the stop token; ``prompt_length`` columns of prompt;
    ``requests`` the engine's requests, row by row (log-probabilities, finish reasons, text)."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    prompt_length: int
    requests: list[Request]

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


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
    generator: torch.Generator | None = None,
    logprobs: bool = False,
    compile: bool = False,
    stop_together: Callable[[bool], bool] | None = None,
) -> GenerationOutput:
    """Continue each prompt row of ``input_ids`` (B, T), left-padded where ``attention_mask`` is 0.

    Greedy unless ``do_sample``. A row stops after any of ``stop_token_ids`` (default: the config's
    EOS ids). ``num_return_sequences`` samples per prompt are adjacent rows (GRPO groups). With a
    ``generator``, each row's random stream is seeded from it in row order (reproducible); without one,
    sampled rows draw fresh seeds. ``compile``: decode through the torch.compile'd step (CPU; see
    :class:`~doge_cli.inference.Engine`).
    """
    config = model.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, greedy=not do_sample)
    requests = []
    for prompt in prompts:
        for _ in range(num_return_sequences):
            stream = None
            if do_sample and generator is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
                stream = torch.Generator(device=model.device).manual_seed(seed)
            requests.append(Request(prompt, params, stop_token_ids=list(stop_token_ids) if stop_token_ids is not None
                                    else None, logprobs=logprobs, generator=stream))
    Engine(model, max_batch=len(requests), stop_together=stop_together, compile=compile).generate(requests)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    width = max(len(r.token_ids) for r in requests)
    new = torch.full((len(requests), width), pad_token_id, dtype=torch.long)
    for i, request in enumerate(requests):
        new[i, :len(request.token_ids)] = torch.tensor(request.token_ids, dtype=torch.long)
    sequences = torch.cat((input_ids.cpu().repeat_interleave(num_return_sequences, dim=0), new), dim=1)
    lengths = torch.tensor([len(r.token_ids) for r in requests])
    device = input_ids.device
    return GenerationOutput(sequences.to(device), lengths.to(device), input_ids.shape[1], requests)
