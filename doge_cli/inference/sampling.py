"""Sampling settings of a request and the choice of the next token.

Processors run in transformers' order: repetition penalty, then (when sampling) temperature, top-k and
top-p; greedy takes the largest logit after the penalty. Each request samples from its own
``torch.Generator`` (seeded by ``seed``), so its tokens do not depend on which other requests share its
batch. The log-probability reported for a chosen token is under the model's distribution at the
sampling temperature, before top-k / top-p (what GRPO's ratio uses). Top-p draws need no sort of the
vocabulary (:func:`_nucleus_draw`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from doge_cli.errors import DogeError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MIN_TEMPERATURE = 1e-4  # below this, logits / temperature overflow to inf (NaN probabilities) long before 1e-45


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
        if self.temperature < MIN_TEMPERATURE:
            raise DogeError(f"temperature must be at least {MIN_TEMPERATURE:g} (use greedy=true for deterministic "
                            "replies)")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise DogeError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
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


NUCLEUS_TRIES = 8  # draws a row makes from the whole distribution before its nucleus is built by sorting


def _draw(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One token per row of (n, V) ``probs`` (rows need not sum to 1): an inverse-CDF draw with one
    uniform number from each row's own generator."""
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    cdf = probs.cumsum(dim=-1)
    # right=True: the first token whose cumulative mass exceeds the draw, so no zero-mass token is picked
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return chosen.clamp_(max=probs.shape[-1] - 1)


def _nucleus_draw(probs: torch.Tensor, top_p: float, generators: list) -> torch.Tensor:
    """Nucleus sampling without sorting the vocabulary: draw from the whole distribution and keep the
    draw when it lies in the nucleus (the tokens likelier ones of which hold less than ``top_p`` of the
    mass), else draw again. Kept draws follow the renormalised nucleus exactly, and since the nucleus
    holds at least ``top_p`` of the mass a row rarely needs a second draw. A row still outside after
    :data:`NUCLEUS_TRIES` draws (a tiny ``top_p`` over a flat distribution) gets its nucleus built by
    sorting (:func:`filter_top_k_top_p`) and one draw from it. Ties at the nucleus' edge are all kept.

    Sorting 32k logits costs ~2 ms per row on a CPU core, ten times a model step of Doge-20M's share.
    """
    n = probs.shape[0]
    chosen = torch.empty(n, dtype=torch.long, device=probs.device)
    pending = list(range(n))
    for _ in range(NUCLEUS_TRIES):
        index = torch.tensor(pending, device=probs.device)
        rows = probs.index_select(0, index)
        tokens = _draw(rows, [generators[i] for i in pending])
        mass = rows.sum(dim=-1)
        picked = rows.gather(-1, tokens[:, None])
        likelier = torch.where(rows > picked, rows, 0.0).sum(dim=-1)
        inside = (likelier < top_p * mass).tolist()
        chosen[index] = torch.where(torch.tensor(inside, device=probs.device), tokens, chosen[index])
        pending = [row for row, ok in zip(pending, inside) if not ok]
        if not pending:
            return chosen
    index = torch.tensor(pending, device=probs.device)
    nucleus = filter_top_k_top_p(probs.index_select(0, index).log(), top_p=top_p)
    chosen[index] = _draw(torch.softmax(nucleus, dim=-1), [generators[i] for i in pending])
    return chosen


class RowSampler:
    """What one request needs to choose its tokens: its settings, its random stream, the tokens it has seen."""

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
        tokens, logprobs = choose_tokens(logits[None], [self], [want_logprob])
        return tokens[0], logprobs[0]


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of (n, V) ``logits``: the first maximum, and a row's first NaN where it has one
    (torch's rule, which numpy's argmax shares). On a CPU, float32 rows go through numpy's vectorised argmax:
    torch's takes ~180 us for one 32k-vocabulary row there (and milliseconds for eight on a busy 2-core
    machine) against numpy's ~30 us, a share of every decoding step at batch 1."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler], want_logprobs: list[bool]
                  ) -> tuple[list[int], list[float | None]]:
    """The next token of every row of (n, V) fp32 ``logits``, row ``i`` chosen as ``samplers[i]`` says.

    Rows are processed together where they can be: one argmax for the greedy rows, and for sampled rows
    that share their settings one filter, one softmax and an inverse-CDF draw with one uniform number from
    each row's own random stream (so a row's tokens depend on its stream alone, not on its neighbours).
    """
    n = logits.shape[0]
    tokens: list[int] = [0] * n
    logprobs: list[float | None] = [None] * n
    penalised = [i for i, s in enumerate(samplers) if s.seen is not None]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            logits[i] = apply_repetition_penalty(logits[i], samplers[i].seen, samplers[i].params.repetition_penalty)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        p = s.params
        groups.setdefault(("greedy",) if p.greedy else (p.temperature, p.top_k, p.top_p), []).append(i)
    for key, rows in groups.items():
        part = logits.index_select(0, torch.tensor(rows, device=logits.device)) if len(rows) < n else logits
        if key == ("greedy",):
            scaled = part
            chosen = greedy_tokens(part)
        else:
            temperature, top_k, top_p = key
            scaled = part / temperature
            probs = torch.softmax(filter_top_k_top_p(scaled, top_k), dim=-1)
            generators = [samplers[i].generator for i in rows]
            chosen = _draw(probs, generators) if top_p >= 1.0 else _nucleus_draw(probs, top_p, generators)
        picked = chosen.tolist()
        need = [j for j, i in enumerate(rows) if want_logprobs[i]]
        values = torch.log_softmax(scaled[need], dim=-1).gather(-1, chosen[need][:, None]).squeeze(-1).tolist() \
            if need else []
        for j, i in enumerate(rows):
            tokens[i] = picked[j]
        for j, value in zip(need, values):
            logprobs[rows[j]] = value
    for i in penalised:
        samplers[i].seen[tokens[i]] = True
    return tokens, logprobs
