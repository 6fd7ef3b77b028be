from doge_cli.data.builtin import BUILTIN_SOURCES, build_builtin_rows
from doge_cli.data.maths import generate_problems


def test_pretraining_corpus_is_at_least_10_mib():
    total = sum(
        len(r["text"].encode("utf-8"))
        for name, src in BUILTIN_SOURCES.items()
        if src.stage == "pt"
        for r in build_builtin_rows(name)
    )
    assert total >= 10 * 2**20


def test_held_out_text_is_not_in_training_text():
    held = {r["text"] for r in build_builtin_rows("heldout-text")}
    assert len(held) > 100
    for name in ("bible-kjv", "bible-web", "fortunes", "python-docs"):
        assert held.isdisjoint(r["text"] for r in build_builtin_rows(name))


def test_no_offensive_fortune_files():
    from doge_cli.data import builtin

    keys = [k for k, _ in builtin._fortunes()]
    assert keys and not any(k.split("/")[1].endswith("-o") for k in keys)


def test_maths_is_seeded_and_eval_is_held_out():
    a = generate_problems(30, seed=1)
    assert a == generate_problems(30, seed=1)
    assert a != generate_problems(30, seed=2)
    eval_q = {r["question"] for r in build_builtin_rows("arithmetic")}
    train_q = {r["prompt"] for r in build_builtin_rows("math-grpo", max_examples=500)}
    assert eval_q.isdisjoint(train_q)


def test_dpo_pairs_differ_and_mc_has_one_gold():
    for name in ("math-dpo", "chatterbot-dpo"):
        rows = build_builtin_rows(name, max_examples=200)
        assert all(r["chosen"] != r["rejected"] for r in rows)
    for r in build_builtin_rows("chatterbot-mc"):
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4


def test_chatterbot_mc_questions_are_not_trained_on():
    rows = build_builtin_rows("chatterbot-mc")
    mc = {r["question"].lower() for r in rows}
    sft = build_builtin_rows("chatterbot")
    assert mc and mc.isdisjoint(r["messages"][0]["content"].lower() for r in sft)
    # nor any choice: distractors drawn from training replies were text the model had learned, and it
    # preferred them to the unseen gold reply (acc 0.13-0.17, below chance, for every stage)
    trained = {m["content"] for r in sft for m in r["messages"][1:]}
    assert not {c for r in rows for c in r["choices"]} & trained


def test_chatterbot_mc_choices_carry_no_length_signal():
    """Distractors are about as long as the gold reply, so neither a summed nor a length-normalised score
    can win by length (drawn from all replies they were longer in most rows, and acc_norm sat at 0.02)."""
    import statistics

    rows = build_builtin_rows("chatterbot-mc")
    gold = [len(r["choices"][r["label"]]) for r in rows]
    others = [len(c) for r in rows for i, c in enumerate(r["choices"]) if i != r["label"]]
    assert abs(statistics.median(gold) - statistics.median(others)) <= 0.15 * statistics.median(gold)
    longest = sum(len(r["choices"][r["label"]]) == max(map(len, r["choices"])) for r in rows) / len(rows)
    shortest = sum(len(r["choices"][r["label"]]) == min(map(len, r["choices"])) for r in rows) / len(rows)
    assert longest <= 0.35 and shortest <= 0.35  # 0.25 each if length said nothing
    for r in rows:
        answer = len(r["choices"][r["label"]])
        assert sum(1 / 2 <= len(c) / answer <= 2 for c in r["choices"]) >= 3  # nearly all within 2x


def test_acc_norm_is_the_per_character_log_probability_choice():
    """The acc_norm doge eval reports: the choice with the highest log-probability per character (the
    leading space counted), checked by hand on choices of different lengths."""
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import Doc

    from doge_cli.eval.tasks import _acc_norm

    doc = Doc(task_name="t", query="Q", choices=[" short", " a much longer answer"], gold_index=1)
    # per character: -3/6 = -0.5 against -8/21 = -0.381: the longer choice wins though its sum is lower
    response = ModelResponse(logprobs=[-3.0, -8.0], output_tokens=[[1], [2, 3, 4]])
    metric = _acc_norm()
    assert metric.sample_level_fn.compute(doc=doc, model_response=response) == 1
    response = ModelResponse(logprobs=[-3.0, -11.0], output_tokens=[[1], [2, 3, 4]])  # -11/21 = -0.524 < -0.5
    assert metric.sample_level_fn.compute(doc=doc, model_response=response) == 0


def test_the_builtin_data_is_the_same_in_every_process():
    """The maths generator iterates sets of strings (salted per process); the same seed once gave other
    problems in another process, so two runs of the quickstart trained on different data. Two interpreters
    with different string-hash salts must build the same rows."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from doge_cli.data.builtin import build_builtin_rows; "
            "print(hashlib.sha1(json.dumps([build_builtin_rows(n, max_examples=40) for n in "
            "('math-sft', 'math-dpo', 'math-grpo', 'chatterbot-dpo')], sort_keys=True).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": salt}).stdout.strip() for salt in ("1", "2")}
    assert len(digests) == 1, digests
