"""Seeded school-maths problems with exact answers, from DeepMind's mathematics-dataset generator.

mathematics-dataset 1.0.1 imports ``base_solution_linear`` from ``sympy.solvers.diophantine``,
which sympy 1.14 only exposes on the inner ``diophantine`` module; we re-export it before the
first import. The generator draws from the global ``random`` and ``numpy.random`` states, so we
seed them and put the caller's states back afterwards.

The generator (and sympy under it) also iterates sets of strings, whose order follows Python's string
hashing, which is salted per process: the same seed gave other problems in another process. Problems
are therefore generated in a child interpreter with ``PYTHONHASHSEED=0`` (unless this one already runs
with it), so a seed names the same problems in every run and on every machine.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator

# The generator's own limits (generate_settings), kept so answers stay short and checkable.
MAX_QUESTION_CHARS = 160
MAX_ANSWER_CHARS = 30

# Arithmetic and linear equations: answers a small model can learn to produce exactly.
_MODULES = (
    ("arithmetic", "add_or_sub"),
    ("arithmetic", "add_sub_multiple"),
    ("arithmetic", "mul"),
    ("arithmetic", "div"),
    ("arithmetic", "mixed"),
    ("arithmetic", "mul_div_multiple"),
    ("algebra", "linear_1d"),
    ("algebra", "linear_2d"),
)


def _import_generator():
    import sympy.solvers.diophantine  # noqa: F401  (registers the package in sys.modules)

    package = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(package, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = inner.base_solution_linear
    from mathematics_dataset.modules import algebra, arithmetic

    return {"arithmetic": arithmetic, "algebra": algebra}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def generate_problems(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """``n`` distinct problems as ``{"question", "answer", "module"}``, the same for the same seed in every
    process (see the module docstring).

    Modules are taken in turn so every kind is represented; questions in ``exclude`` (e.g. a
    held-out set) and repeats are skipped.
    """
    if os.environ.get("PYTHONHASHSEED") == HASH_SEED:
        return _generate(n, seed, exclude)
    request = json.dumps({"n": n, "seed": seed, "exclude": sorted(exclude)})
    code = ("import json, sys; from doge_cli.data.maths import _generate; r = json.loads(sys.stdin.read()); "
            "print(json.dumps(_generate(r['n'], r['seed'], frozenset(r['exclude']))))")
    done = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True, text=True,
                          env={**os.environ, "PYTHONHASHSEED": HASH_SEED})
    if done.returncode != 0:
        raise RuntimeError(f"generating the maths problems failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


HASH_SEED = "0"


def _generate(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    groups = _import_generator()
    # Easy third of the generator's entropy range: hard items are out of reach for tiny models.
    def easy(r):
        return (r[0], r[0] + (r[1] - r[0]) / 3)

    with _seeded(seed):
        makers = [(f"{g}__{m}", groups[g].train(easy)[m]) for g, m in _MODULES]
        out: list[dict] = []
        seen = set(exclude)
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                break  # the generator cannot supply more distinct short problems
            name, make = makers[attempts % len(makers)]
            problem = make()
            question, answer = str(problem.question).strip(), str(problem.answer).strip()
            if len(question) > MAX_QUESTION_CHARS or len(answer) > MAX_ANSWER_CHARS or question in seen:
                continue
            seen.add(question)
            out.append({"question": question, "answer": answer, "module": name})
    return out


def wrong_answer(answer: str, rng: random.Random, others: list[str]) -> str:
    """A plausible but wrong answer: an integer off by a little, else another problem's answer."""
    try:
        value = int(answer)
    except ValueError:
        candidates = [a for a in others if a != answer]
        return rng.choice(candidates) if candidates else answer + "1"
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return str(value + delta)
