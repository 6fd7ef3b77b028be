import json
import math
from pathlib import Path

import pytest

from doge_cli.errors import DogeError
from doge_cli.eval.baseline import count_units
from doge_cli.eval.lighteval_patches import only_these_tasks
from doge_cli.eval.run import load_results, model_slug


def test_results_json_has_every_builtin_metric_in_range(results):
    saved = json.loads(Path(results["path"]).read_text())
    assert saved["tasks"] == results["tasks"]
    tasks = saved["tasks"]
    assert set(tasks) == {"heldout-ppl", "chatterbot-mc", "arithmetic"}
    ppl = tasks["heldout-ppl"]
    assert all(math.isfinite(ppl[k]) and ppl[k] > 0 for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
    assert 0 <= tasks["chatterbot-mc"]["acc_norm"] <= 1
    base = saved["baselines"]["heldout-ppl"]["unigram"]
    assert base["fitted_on"] == "held-out text" and math.isfinite(base["bits_per_byte"]) and base["tokens"] > 0
    assert saved["versions"]["lighteval"] == "0.13.0" and saved["num_fewshot"] == 0
    assert saved["precision"] == "fp32"  # the weights as saved (--dtype auto, no --quantize)


def test_forced_answers_score_perfectly(results):
    assert results["tasks"]["chatterbot-mc"]["acc"] == 1.0  # the short right answer beats long wrong ones
    assert results["tasks"]["arithmetic"]["em"] == 1.0  # the model is wired to answer " 4"


def test_perplexity_matches_transformers_doge(results, eval_env):
    """The same documents scored by transformers' own DogeForCausalLM over the whole sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = eval_env["tokenizer"]
    hf = AutoModelForCausalLM.from_pretrained(eval_env["model"]).eval()
    rows = (eval_env["datasets"] / "eval" / "heldout-text" / "test.jsonl").read_text().splitlines()
    texts = [json.loads(r)["text"] for r in rows]
    assert max(len(tok(t)["input_ids"]) for t in texts) > hf.config.max_position_embeddings
    total, n_bytes, words = 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits.float(), -1)[0, :-1]
        total += float(logprobs.gather(-1, ids[0, 1:, None]).sum())
        w, b = count_units(text)
        words, n_bytes = words + w, n_bytes + b
    ppl = results["tasks"]["heldout-ppl"]
    assert ppl["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)
    assert ppl["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-3)


def test_registry_is_restored_after_a_run(results):
    from lighteval.tasks.registry import Registry

    with only_these_tasks([]):
        assert Registry.load_all_task_configs() == {}
    assert Registry.load_all_task_configs.__name__ == "load_all_task_configs"


def test_load_results_errors(tmp_path):
    with pytest.raises(DogeError, match="does not exist"):
        load_results(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DogeError, match="not a doge eval results file"):
        load_results(bad)


def test_model_slug():
    assert model_slug("./runs/pt/final") == "runs-pt-final"
    assert model_slug("SmallDoge/Doge-20M") == "SmallDoge-Doge-20M"


def test_autograd_stays_on_after_an_evaluation(results):
    """lighteval turns autograd off process-wide at import; evaluate() must hand it back."""
    import torch

    assert torch.is_grad_enabled()
