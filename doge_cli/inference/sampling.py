"""Sampling settings of a request and the choice of the next token.

Processors run in transformers' order: repetition penalty, then (when sampling) temperature, top-k and
top-p; greedy takes the largest logit after the penalty. Each request samples from its own
``torch.Generator`` (seeded by ``seed``), so its tokens do not depend on which other requests share its
batch. The log-probability reported for a chosen token is under the model's distribution at the
sampling temperature, before top-k / top-p (what GRPO's ratio uses).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from doge_cli.errors import DogeError


@dataclass
class SamplingParams:
    """How one request is generated; the defaults are the seed's chat settings (SmallDoge's examples)."""

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise DogeError(f"{name} must be a finite number")
        if self.max_new_tokens < 1:
            raise DogeError("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            raise DogeError("temperature must be > 0 (use greedy=true for deterministic replies)")
        if not 0 < self.top_p <= 1:
            raise DogeError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise DogeError("top_k must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise DogeError("repetition_penalty must be > 0 (1.0 turns it off)")

    def set(self, key: str, value: str) -> None:
        """Set one field from text, e.g. ``set("temperature", "0.5")``; DogeError on a bad key or value."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        if key not in fields:
            raise DogeError(f"unknown parameter {key!r}; choose from: {', '.join(fields)}")
        old = getattr(self, key)
        try:
            if key == "greedy":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                parsed: object = value.lower() in ("true", "1", "yes", "on")
            elif key == "seed":
                parsed = None if value.lower() in ("none", "") else int(value)
            elif key in ("max_new_tokens", "top_k"):
                parsed = int(value)
            else:
                parsed = float(value)
        except ValueError as err:
            raise DogeError(f"bad value {value!r} for {key}") from err
        setattr(self, key, parsed)
        try:
            self.validate()
        except DogeError:
            setattr(self, key, old)
            raise

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, eq. 1 as transformers applies it): seen tokens' logits are
    divided by ``penalty`` when positive and multiplied when negative. ``seen`` bool, like ``logits``."""
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


class RowSampler:
    """The next-token choice of one request: its settings, its random stream, the tokens it has seen."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int], device,
                 generator: torch.Generator | None = None):
        self.params = params
        self.generator = generator
        if generator is None and not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True

    def choose(self, logits: torch.Tensor, want_logprob: bool) -> tuple[int, float | None]:
        """The next token for this request's (V,) fp32 logits, and its log-probability when asked."""
        p = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if p.greedy:
            token = int(logits.argmax())
            scaled = logits
        else:
            scaled = logits / p.temperature
            filtered = filter_top_k_top_p(scaled, p.top_k, p.top_p)
            token = int(torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
        logprob = float(torch.log_softmax(scaled, dim=-1)[token]) if want_logprob else None
        return token, logprob


def choose_greedy(logits: torch.Tensor) -> list[int]:
    """Greedy choices of a whole batch at once (rows without a penalty)."""
    return logits.argmax(dim=-1).tolist()
