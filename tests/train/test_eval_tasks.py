"""logging.eval_tasks: doge eval's tasks in-process while a run trains, logged at the scheduled steps and at
the end, equal to doge eval on the exported model, checked before training starts, and invisible to the
training itself."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.eval.run import evaluate
from doge_cli.train.core import train
from doge_cli.train.eval_tasks import flatten, prepare
from doge_cli.train.objectives import objective_for
from tests.eval.conftest import make_eval_sets

from .conftest import launch_train, tiny_overrides
from .objectives.chat_fixtures import chat_root, overrides, sft_data, tok  # noqa: F401

MAX_SAMPLES = 4  # fewer than every builtin test set holds, so the cap is exercised


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def pt_run(pt_data, out, steps=4, **extra):
    cfg = resolve_config("pt", hardware="cpu", overrides=tiny_overrides(pt_data, out, steps=steps, **extra))
    return train(cfg, objective_for(cfg))


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    return make_eval_sets(tmp_path_factory.mktemp("evalsets") / "datasets")


def settings(datasets_dir) -> dict:
    return {"logging.eval_tasks": "builtin", "logging.eval_tasks_every": 2,
            "logging.eval_tasks_max_samples": MAX_SAMPLES, "logging.eval_tasks_datasets_dir": str(datasets_dir)}


@pytest.fixture(scope="module")
def evaluated(pt_data, datasets_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "run"
    result = pt_run(pt_data, out, **settings(datasets_dir))
    return result, records(out)


def test_figures_are_logged_at_the_scheduled_steps_and_the_end(evaluated):
    _, logged = evaluated
    with_figures = [r["step"] for r in logged if any(k.startswith("eval/") for k in r)]
    assert with_figures == [2, 4]
    for record in (r for r in logged if r["step"] in (2, 4)):
        assert set(k for k in record if k.startswith("eval/")) == {
            "eval/heldout-ppl/word_perplexity", "eval/heldout-ppl/byte_perplexity", "eval/heldout-ppl/bits_per_byte",
            "eval/chatterbot-mc/acc", "eval/chatterbot-mc/acc_norm", "eval/arithmetic/em"}
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in record if k.startswith("eval/heldout-ppl/"))
        assert all(0 <= record[k] <= 1 for k in ("eval/chatterbot-mc/acc", "eval/chatterbot-mc/acc_norm",
                                                   "eval/arithmetic/em"))
        # Its time is counted and left out of the training time of the window that holds it.
        assert record["eval_tasks_s"] > 0
    after = next(r for r in logged if r["step"] == 3)
    assert after["time_s"] - after["train_s"] >= next(r for r in logged if r["step"] == 2)["eval_tasks_s"]
    # The model learned between the two evaluations: the figures are of the model as it is at each step.
    first, last = (next(r for r in logged if r["step"] == s) for s in (2, 4))
    assert last["eval/heldout-ppl/bits_per_byte"] != first["eval/heldout-ppl/bits_per_byte"]


def test_the_last_figures_equal_doge_eval_on_the_exported_model(evaluated, datasets_dir):
    result, logged = evaluated
    oracle = evaluate(str(result.final_dir), tasks=["builtin"], datasets_dir=datasets_dir, output_dir=None,
                      max_samples=MAX_SAMPLES, batch_size=2, device="cpu")
    expected = flatten(oracle["tasks"])
    last = {k: v for k, v in logged[-1].items() if k.startswith("eval/")}
    assert last.keys() == expected.keys()
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_training_is_the_same_with_or_without_them(evaluated, pt_data, tmp_path):
    """The evaluation draws from no random stream training uses (lighteval reseeds Python's and NumPy's)."""
    result, logged = evaluated
    plain = pt_run(pt_data, tmp_path / "plain")
    assert [r["loss"] for r in records(tmp_path / "plain")] == [r["loss"] for r in logged]
    a, b = (load_file(str(Path(r.final_dir) / "model.safetensors")) for r in (result, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.is_grad_enabled()


def test_under_zero3_every_process_runs_the_evaluation_in_step(evaluated, pt_data, datasets_dir, tmp_path):
    """Two ZeRO-3 processes (gloo on CPU): each forward gathers the sharded weights, so both run every
    evaluation (a main-process-only one would hang); the logged figures are the one-process run's."""
    out = tmp_path / "run"
    stdout, logged = launch_train("pt", tiny_overrides(pt_data, out, steps=4, **settings(datasets_dir)), out,
                                  "zero3.yaml")
    assert "x 2 processes" in stdout
    one = {r["step"]: r for r in evaluated[1]}
    for record in (r for r in logged if r["step"] in (2, 4)):
        figures = {k: v for k, v in record.items() if k.startswith("eval/")}
        assert figures.keys() == {k for k in one[record["step"]] if k.startswith("eval/")}
        for key, value in figures.items():
            assert value == pytest.approx(one[record["step"]][key], rel=1e-3), key


def test_an_unknown_task_is_refused_when_the_config_is_read(pt_data, tmp_path):
    with pytest.raises(DogeError, match=r"logging\.eval_tasks.*unknown task 'heldout'") as err:
        resolve_config("pt", hardware="cpu", overrides=tiny_overrides(
            pt_data, tmp_path / "run", **{"logging.eval_tasks": "[heldout, arithmetic]"}))
    assert "\n" not in str(err.value)
    with pytest.raises(DogeError, match="names no task"):
        resolve_config("pt", hardware="cpu", overrides=tiny_overrides(pt_data, tmp_path / "run",
                                                                      **{"logging.eval_tasks": "' , '"}))


@pytest.mark.parametrize("task, missing", [("arithmetic", "eval/arithmetic/test.jsonl"),
                                           ("sft-loss", "merged/sft")])
def test_missing_data_is_found_before_training_starts(pt_data, tmp_path, task, missing):
    out = tmp_path / "run"
    with pytest.raises(DogeError, match="logging.eval_tasks_datasets_dir") as err:
        pt_run(pt_data, out, **{"logging.eval_tasks": task, "logging.eval_tasks_datasets_dir": str(tmp_path / "none")})
    assert missing in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()  # nothing was written: training never started


def test_a_chat_stage_asks_in_its_chat_template_as_doge_eval_does(sft_data, chat_root, tok, tmp_path):  # noqa: F811
    datasets_dir = make_eval_sets(tmp_path / "datasets")
    (datasets_dir / "merged").mkdir()
    (datasets_dir / "merged" / "sft").symlink_to(sft_data, target_is_directory=True)
    out = tmp_path / "run"
    cfg = resolve_config("sft", hardware="cpu", overrides=overrides(
        sft_data, out, chat_root / "start", steps=2, **{"logging.eval_tasks": "[arithmetic, sft-loss]",
                                                        "logging.eval_tasks_max_samples": MAX_SAMPLES,
                                                        "logging.eval_tasks_datasets_dir": str(datasets_dir)}))
    assert prepare(cfg, tok).use_chat_template
    result = train(cfg, objective_for(cfg))
    logged = records(out)
    assert [r["step"] for r in logged if "eval_tasks_s" in r] == [2]
    oracle = evaluate(str(result.final_dir), tasks=["arithmetic", "sft-loss"], datasets_dir=datasets_dir,
                      output_dir=None, max_samples=MAX_SAMPLES, batch_size=4, device="cpu", use_chat_template=True)
    expected = flatten(oracle["tasks"])
    assert set(expected) == {"eval/arithmetic/em", "eval/sft-loss/loss"}
    for key, value in expected.items():
        assert logged[-1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_chat_stage_without_a_chat_template_is_refused(pt_data, tmp_path):
    from transformers import AutoTokenizer

    cfg = resolve_config("sft", hardware="cpu", overrides=[f"output_dir={tmp_path / 'run'}",
                                                            "logging.eval_tasks=heldout-ppl"])
    plain = AutoTokenizer.from_pretrained(pt_data.parent / "tokenizer")
    assert not plain.chat_template
    with pytest.raises(DogeError, match="chat template"):
        prepare(cfg, plain)
