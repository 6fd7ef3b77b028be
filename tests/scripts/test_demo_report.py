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
