"""scripts/demo_report.py: the demo's own check of the figures it promises."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from doge_cli.eval.run import model_slug

_SPEC = importlib.util.spec_from_file_location(
    "demo_report", Path(__file__).resolve().parents[2] / "scripts" / "demo_report.py")
demo_report = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("demo_report", demo_report)  # dataclasses look their module up by name
_SPEC.loader.exec_module(demo_report)


GOOD = {  # stage -> task -> metrics, as doge eval writes them; every figure holds
    "pt": {"sft-loss": {"loss": 6.5, "loss_stderr": 0.2}, "preference": {"accuracy": 0.5, "accuracy_stderr": 0.05},
           "math-reward": {"format": 0.0, "reward_sampled": 0.0}},
    "sft": {"sft-loss": {"loss": 2.1, "loss_stderr": 0.3}, "preference": {"accuracy": 0.67, "accuracy_stderr": 0.047}},
    "dpo": {"preference": {"accuracy": 0.75, "accuracy_stderr": 0.045, "reward_accuracy": 0.7,
                           "reward_accuracy_stderr": 0.046}, "math-reward": {"format": 0.0, "format_stderr": 0.0}},
    "r1-sft": {"math-reward": {"format": 1.0, "format_sampled": 0.4, "reward_sampled": 0.40,
                               "reward_sampled_stderr": 0.025}},
    "grpo": {"math-reward": {"format": 1.0, "reward_sampled": 0.50, "reward_sampled_stderr": 0.024}},
}


def write_all(eval_dir, runs, tasks, ppl=400.0, unigram=10000.0):
    eval_dir.mkdir(parents=True, exist_ok=True)
    for stage, metrics in tasks.items():
        model = runs / stage / "final"
        results = {"model": str(model), "tasks": {k: dict(v) for k, v in metrics.items()}, "baselines": {}}
        if stage == "pt":
            results["tasks"]["heldout-ppl"] = {"word_perplexity": ppl, "byte_perplexity": 3.0, "bits_per_byte": 1.5}
            results["baselines"]["heldout-ppl"] = {"unigram": {"word_perplexity": unigram, "byte_perplexity": 5.0,
                                                               "bits_per_byte": 2.5}}
        (eval_dir / f"{model_slug(str(model))}.json").write_text(json.dumps(results))


def with_change(stage, task, key, value):
    tasks = json.loads(json.dumps(GOOD))
    tasks[stage][task][key] = value
    return tasks


@pytest.mark.parametrize(("tasks", "ppl", "failing"), [
    (GOOD, 400.0, None),
    (GOOD, 20000.0, "pt"),                                                   # worse than a unigram model
    (with_change("sft", "sft-loss", "loss", 6.4), 400.0, "sft"),             # lower, but within the error
    (with_change("dpo", "preference", "reward_accuracy", 0.53), 400.0, "dpo"),  # not clear of chance
    (with_change("dpo", "preference", "accuracy", 0.6), 400.0, None),        # reported, not judged
    (with_change("r1-sft", "math-reward", "format", 0.0), 400.0, "r1-sft"),
    (with_change("grpo", "math-reward", "reward_sampled", 0.42), 400.0, "grpo"),  # within the error
])
def test_each_figure_holds_only_past_its_standard_error(tmp_path, capsys, tasks, ppl, failing):
    runs = tmp_path / "runs"
    write_all(tmp_path / "eval", runs, tasks, ppl=ppl)
    rc = demo_report.main(["--runs", str(runs), "--eval-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  ") and line.endswith(("OK", "NOT MET",
                                                                                             "(reported)"))]
    assert len(lines) == 6 and lines[3].endswith("(reported)")
    assert rc == (0 if failing is None else 1)
    bad = [line.split()[0] for line in lines if line.endswith("NOT MET")]
    assert bad == ([] if failing is None else [failing])
    assert f"{ppl:,.1f}" in lines[0] and "10,000.0" in lines[0]
    grpo = tasks["grpo"]["math-reward"]["reward_sampled"]
    assert f"{grpo:.3f} ± 0.024" in lines[5] and "0.400 ± 0.025" in lines[5]


def test_a_missing_stage_figure_names_the_command(tmp_path):
    runs = tmp_path / "runs"
    tasks = json.loads(json.dumps(GOOD))
    del tasks["dpo"]["preference"]
    write_all(tmp_path / "eval", runs, tasks)
    with pytest.raises(SystemExit, match=r"has no preference reward_accuracy; run `doge eval --tasks builtin,stages"):
        demo_report.main(["--runs", str(runs), "--eval-dir", str(tmp_path / "eval")])


def fake_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "doge_run.json").write_text(json.dumps({"stage": "pt"}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_moe_continuation_is_reported_against_the_dense_one(tmp_path):
    runs = tmp_path / "runs"
    assert demo_report.continuation_figure(runs) is None  # the demo did not run it: nothing to say
    fake_run(runs / "pt-moe", [{"step": 40, "loss": 4.3, "tokens_per_s": 5000.0},
                               {"step": 80, "loss": 4.2, "eval_loss": 4.2141, "tokens_per_s": 5400.0},
                               {"step": 80, "tokens_per_s": 100.0}])
    fake_run(runs / "pt-dense", [{"step": 80, "loss": 4.1, "eval_loss": 4.2062, "tokens_per_s": 8800.0}])
    line = demo_report.continuation_figure(runs)
    assert line == ("  dense -> MoE continuation, 80 steps: held-out loss upcycled MoE 4.2141 vs dense 4.2062 "
                    "nats/token (+0.0079); 5,000 vs 8,800 tokens/s  (reported, no verdict)")


def saturated(grpo_reward):
    """R1-SFT already in the format 95% of the time (its reward 0.99): GRPO has to keep the reward."""
    tasks = json.loads(json.dumps(GOOD))
    tasks["r1-sft"]["math-reward"].update(format_sampled=0.95, reward_sampled=0.99)
    tasks["grpo"]["math-reward"]["reward_sampled"] = grpo_reward
    return tasks


@pytest.mark.parametrize(("grpo_reward", "holds"), [(1.001, True), (0.97, True), (0.95, False)])
def test_after_a_saturated_r1_sft_grpo_has_to_keep_the_reward(tmp_path, capsys, grpo_reward, holds):
    runs = tmp_path / "runs"
    write_all(tmp_path / "eval", runs, saturated(grpo_reward))
    rc = demo_report.main(["--runs", str(runs), "--eval-dir", str(tmp_path / "eval")])
    grpo = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  grpo")][0]
    assert "at training temperature, kept" in grpo and f"{grpo_reward:.3f} ± 0.024" in grpo
    assert rc == (0 if holds else 1) and grpo.endswith("OK" if holds else "NOT MET")
