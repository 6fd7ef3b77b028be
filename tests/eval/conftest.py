"""Builtin eval sets and a forced model, built in tmp dirs, and one lighteval run shared by the tests.

The forced model (tests/chat/toymodel.py) answers every arithmetic prompt with " 4", and the
multiple-choice set pairs a one-word right answer with long wrong ones, so both tasks have a
known perfect score; held-out perplexity is checked against transformers' own Doge.
"""

import json
from pathlib import Path

import pytest

from doge_cli.eval.tasks import PROMPT
from tests.chat.toymodel import chain_of, make_chat_tokenizer, save_forced_model

LONG = " ".join(["and the one that was not the answer at all"] * 4)


def _write_set(root: Path, name: str, rows: list[dict]) -> None:
    folder = root / "eval" / name
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_eval_sets(root: Path) -> Path:
    from pydoc_data.topics import topics

    texts = [t for t in topics.values() if 300 < len(t) < 1500][:6]
    texts.append(" ".join(topics["if"] for _ in range(3)))  # longer than the context: scored in windows
    _write_set(root, "heldout-text", [{"text": t} for t in texts])
    _write_set(root, "chatterbot-mc", [
        {"question": f"Question {i}?", "choices": [LONG + f" {j}" if j != i % 4 else "yes" for j in range(4)],
         "label": i % 4} for i in range(8)])
    _write_set(root, "arithmetic", [{"question": f"What is {i} + {4 - i}?", "answer": "4"} for i in range(6)])
    return root


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = make_chat_tokenizer(root / "tokenizer")
    prompt = tok(PROMPT.format(question="What is 1 + 3?"), add_special_tokens=False)["input_ids"]
    answer = tok(" 4", add_special_tokens=False)["input_ids"]
    model = save_forced_model(root / "model", tok, chain_of([prompt[-1], *answer]))
    return {"root": root, "model": model, "tokenizer": tok, "datasets": make_eval_sets(root / "datasets")}


@pytest.fixture(scope="session")
def results(eval_env):
    from doge_cli.eval.run import evaluate

    return evaluate(str(eval_env["model"]), datasets_dir=eval_env["datasets"], output_dir=eval_env["root"] / "out",
                    batch_size=4, device="cpu")
