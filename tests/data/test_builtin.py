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
    mc = {r["question"].lower() for r in build_builtin_rows("chatterbot-mc")}
    sft = {r["messages"][0]["content"].lower() for r in build_builtin_rows("chatterbot")}
    assert mc and mc.isdisjoint(sft)
