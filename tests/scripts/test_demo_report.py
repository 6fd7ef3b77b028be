"""scripts/demo_report.py: the demo's own check of the figures it promises."""

import importlib.util
import json
from pathlib import Path

import pytest

from doge_cli.eval.run import model_slug

_SPEC = importlib.util.spec_from_file_location(
    "demo_report", Path(__file__).resolve().parents[2] / "scripts" / "demo_report.py")
demo_report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(demo_report)


def write_results(eval_dir, model, word_ppl, unigram_ppl):
    eval_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "model": str(model),
        "tasks": {"heldout-ppl": {"word_perplexity": word_ppl, "byte_perplexity": 3.0, "bits_per_byte": 1.5}},
        "baselines": {"heldout-ppl": {"unigram": {"word_perplexity": unigram_ppl, "byte_perplexity": 5.0,
                                                  "bits_per_byte": 2.5}}},
    }
    (eval_dir / f"{model_slug(str(model))}.json").write_text(json.dumps(results))


@pytest.mark.parametrize(("ppl", "sft_loss", "code"), [(400.0, 2.0, 0), (20000.0, 2.0, 1), (400.0, 9.0, 1)])
def test_verdicts(tmp_path, monkeypatch, capsys, ppl, sft_loss, code):
    runs = tmp_path / "runs"
    write_results(tmp_path / "eval", runs / "pt" / "final", ppl, 10000.0)
    losses = {str(runs / "pt" / "final"): 6.5, str(runs / "sft" / "final"): sft_loss}
    monkeypatch.setattr("doge_cli.eval.sft_loss.assistant_token_loss",
                        lambda model, data, **kw: {"loss": losses[model], "tokens": 900, "rows": 100})
    rc = demo_report.main(["--datasets-dir", str(tmp_path / "datasets"), "--runs", str(runs),
                           "--eval-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert rc == code
    assert ("NOT MET" in out) == (code == 1)
    assert f"pretrained {ppl:,.1f} vs unigram 10,000.0" in out


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
