"""The `doge eval` table: short model labels, full metric names, five models within 100 columns."""

from __future__ import annotations

from rich.console import Console

from doge_cli.eval.report import results_table, short_labels


def test_labels_keep_only_the_parts_that_differ():
    assert short_labels(["./runs/quickstart/pt/final", "./runs/quickstart/dpo/final"]) == ["pt", "dpo"]
    assert short_labels(["runs/a/final", "other/b/final"]) == ["runs/a", "other/b"]
    assert short_labels(["./runs/quickstart/pt/final"]) == ["pt"]
    assert short_labels(["SmallDoge/Doge-20M"]) == ["Doge-20M"]
    assert short_labels(["SmallDoge/Doge-20M", "SmallDoge/Doge-60M"]) == ["Doge-20M", "Doge-60M"]
    assert short_labels(["m/final", "m/final"]) == ["m", "m (2)"]  # the same model twice stays two columns


def render(runs, width=100) -> str:
    console = Console(width=width, record=True, highlight=False)
    console.print(results_table(runs))
    return console.export_text()


def test_five_models_fit_100_columns_with_full_metric_names():
    tasks = {
        "heldout-ppl": {"word_perplexity": 13470.2, "word_perplexity_stderr": 275.4, "byte_perplexity": 5.98,
                        "byte_perplexity_stderr": 0.013, "bits_per_byte": 1.633},
        "chatterbot-mc": {"acc": 0.449, "acc_stderr": 0.0505, "acc_norm": 0.194, "acc_norm_stderr": 0.0401},
        "preference": {"accuracy": 0.71, "accuracy_stderr": 0.046, "margin": 25.511, "margin_stderr": 9.348,
                       "reward_accuracy": 0.68, "reward_accuracy_stderr": 0.047, "samples": 100},
        "math-reward": {"format_sampled": 0.493, "format_sampled_stderr": 0.024, "samples": 100},
    }
    baselines = {"heldout-ppl": {"unigram": {"word_perplexity": 10259.3, "byte_perplexity": 5.68,
                                             "bits_per_byte": 2.506}}}
    runs = [{"model": f"./runs/quickstart/{s}/final", "tasks": tasks, "baselines": baselines}
            for s in ("pt", "sft", "dpo", "r1-sft", "grpo")]
    text = render(runs)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 100
    header = next(line for line in lines if "task / metric" in line)
    assert header.split()[3:] == ["pt", "sft", "dpo", "r1-sft", "grpo"]
    for name in ("word_perplexity", "reward_accuracy", "format_sampled", "unigram word_perplexity"):
        assert any(line.strip().startswith(name) for line in lines), name  # whole, never cut
    assert "0.449±0.051" in text and "25.5±9.3" in text and "13,470±275" in text and "1.026e+04" in text
    assert "…" not in text
    row = next(line for line in lines if line.strip().startswith("samples"))
    assert row.split()[1:] == ["100"] * 5
    assert "pt = ./runs/quickstart/pt/final" in text  # the caption maps labels back to the models
