"""Reward functions for GRPO, builtin and user-supplied.

A reward function is any callable with this signature (the builtins follow it too)::

    def my_reward(completions: list[str], answers: list[str], prompts: list[list[dict]], **info) -> list[float]

- ``completions``: the decoded replies of one micro-batch (thinking tokens kept, end-of-turn and
  padding removed), ``num_generations`` adjacent replies per prompt;
- ``answers``: each reply's reference answer (the dataset's ``answer`` column);
- ``prompts``: each reply's prompt as chat messages;
- ``info``: ``completion_lengths`` (list[int], tokens including the stop token),
  ``max_completion_length`` (int) and ``truncated`` (list[bool]: no stop token within the limit);
  accept ``**info`` so new keys do not break a function.

It returns one float per completion (None counts as 0). Name it in the recipe as
``grpo.rewards: [{name: "package.module:function", weight: 1.0}]``; the module must be importable
(installed, or on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

from doge_cli.chat_format import (
    BEGIN_SOLUTION,
    BEGIN_THOUGHT,
    END_SOLUTION,
    END_THOUGHT,
    THINKING_TOKENS,
    final_answer,
    last_boxed,
)
from doge_cli.errors import DogeError

RewardFn = Callable[..., list[float]]

_STRICT_FORMAT = re.compile(
    r"^\s*" + re.escape(BEGIN_THOUGHT) + r".+?" + re.escape(END_THOUGHT) + r"\s*"
    + re.escape(BEGIN_SOLUTION) + r".+?" + re.escape(END_SOLUTION) + r"\s*$",
    re.DOTALL,
)
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/[-+]?\d+(\.\d*)?)?$")


# ------------------------------------------------------------------------------ answers


def normalize_answer(text: str):
    """Maths normalisation: drop ``$``, ``\\boxed``, spaces, thousands separators, a trailing period and
    ``\\frac{a}{b}`` -> ``a/b``; numbers (integers, decimals, fractions) become exact Fractions, so
    ``0.5``, ``1/2`` and ``\\frac{1}{2}`` are equal; anything else is compared as lower-case text."""
    s = text.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = "".join(s.split()).rstrip(".").lower()
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    plain = s.replace("(", "").replace(")", "")
    if _NUMBER.match(plain):
        try:
            if "/" in plain:
                num, den = plain.split("/")
                return Fraction(num) / Fraction(den)
            return Fraction(plain)
        except (ValueError, ZeroDivisionError):
            return s
    return s


def answers_match(predicted: str, reference: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(reference)


# ------------------------------------------------------------------------------ builtins


def accuracy_reward(completions: list[str], answers: list[str], prompts=None, **info) -> list[float]:
    """1 when the reply's final answer (``chat_format.final_answer``: never read from the thinking) equals
    the reference answer after maths normalisation, else 0."""
    return [1.0 if answers_match(final_answer(c), a) else 0.0 for c, a in zip(completions, answers)]


def format_reward(completions: list[str], answers=None, prompts=None, **info) -> list[float]:
    """The R1 thinking format: 1 for ``<|begin_of_thought|> ... <|end_of_thought|> <|begin_of_solution|>
    ... <|end_of_solution|>`` and nothing else; otherwise 1/8 per tag that appears exactly once and in
    order, so at most 0.5 (partial credit gives a small model a gradient towards the format before it
    finds it whole)."""
    out = []
    for text in completions:
        if _STRICT_FORMAT.match(text):
            out.append(1.0)
            continue
        score, pos = 0.0, 0
        for tag in THINKING_TOKENS:
            at = text.find(tag, pos)
            if at < 0 or text.count(tag) != 1:
                break
            score += 0.125
            pos = at + len(tag)
        out.append(score)
    return out


def length_reward(completions: list[str], answers=None, prompts=None, *, completion_lengths: list[int],
                  max_completion_length: int, **info) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) with a buffer of a quarter of the
    limit: 0 up to ``L - buffer`` tokens, then linearly down to -1 at the limit ``L``."""
    buffer = max(1, max_completion_length // 4)
    start = max_completion_length - buffer
    return [0.0 if n <= start else max(-1.0, (start - n) / buffer) for n in completion_lengths]


def repetition_reward(completions: list[str], answers=None, prompts=None, *, ngram: int = 3, **info) -> list[float]:
    """Minus the fraction of repeated word n-grams (n = 3) in a reply: 0 for no repetition, towards -1
    for a loop (the n-gram repetition penalty of Yeo et al. 2025, "Demystifying long chain-of-thought")."""
    out = []
    for text in completions:
        words = text.split()
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(0.0 if not grams else -(1.0 - len(set(grams)) / len(grams)))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length": length_reward,
    "repetition": repetition_reward,
}


def resolve_reward(name: str) -> RewardFn:
    """A builtin reward by name, or ``package.module:function`` imported."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise DogeError(f"unknown reward function {name!r}; use a builtin ({', '.join(BUILTIN_REWARDS)}) or a "
                        "dotted import path 'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DogeError(f"cannot import reward module {module_name!r} ({err}); install it or put it on "
                        "PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DogeError(f"module {module_name!r} has no function {attr!r} for the reward {name!r}")
    return fn


def call_reward(name: str, fn: RewardFn, completions: list[str], answers: list[str], prompts: list, **info,
                ) -> list[float]:
    """Run one reward function and check that it gave one number per completion."""
    values = fn(completions, answers, prompts, **info)
    try:
        values = [0.0 if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise DogeError(f"reward function {name!r} must return a list of numbers, got {type(values).__name__}") from None
    if len(values) != len(completions):
        raise DogeError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
    return values
