"""Pieces of doge eval that need no lighteval run: task names, baseline, windows, SFT loss."""

import math

import pytest

from doge_cli.errors import DogeError
from doge_cli.eval.baseline import unigram_baseline
from doge_cli.eval.lighteval_model import rolling_windows
from doge_cli.eval.tasks import expand_task_names, hub_configs, task_configs


def test_expand_task_names_groups_aliases_and_order():
    assert expand_task_names(None) == ["heldout-ppl", "chatterbot-mc", "arithmetic"]
    assert expand_task_names(["arithmetic,bbh", "reasoning", "arithmetic"]) == [
        "arithmetic", "bigbench_hard", "math_500", "aime24", "gpqa:diamond"]
    with pytest.raises(DogeError, match="unknown task 'nope'"):
        expand_task_names(["nope"])


def test_hub_tasks_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DogeError, match="offline.*heldout-ppl, chatterbot-mc, arithmetic"):
        task_configs(expand_task_names(["base"]), tmp_path)


def test_hub_task_configs_come_from_lighteval_modules():
    """Loaded from their own modules only (no network at import for these)."""
    assert [c.name for c in hub_configs("arc:easy")] == ["arc:easy"]
    assert len(hub_configs("mmlu")) == 57


def test_missing_builtin_set_says_how_to_build_it(tmp_path):
    with pytest.raises(DogeError, match="doge data download --recipe quickstart"):
        task_configs(["arithmetic"], tmp_path)


def test_unigram_baseline_by_hand():
    # tokens a a b, vocabulary 4: p(a) = 3/7, p(b) = 2/7
    result = unigram_baseline([[0, 0, 1]], ["x y"], vocab_size=4)
    logprob = 2 * math.log(3 / 7) + math.log(2 / 7)
    assert result["bits_per_byte"] == pytest.approx(-logprob / 3 / math.log(2))
    assert result["word_perplexity"] == pytest.approx(math.exp(-logprob / 2))
    assert result["token_perplexity"] == pytest.approx(math.exp(-logprob / 3)) and result["tokens"] == 3


@pytest.mark.parametrize("n, max_length", [(1, 8), (2, 8), (8, 8), (9, 8), (30, 8), (31, 7), (100, 2)])
def test_rolling_windows_score_every_token_once_with_history(n, max_length):
    scored = []
    for i, (start, end, first) in enumerate(rolling_windows(n, max_length)):
        assert 0 <= start < first < end <= n and end - start <= max_length
        if i:
            assert first - start >= max_length // 2
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_assistant_token_loss_counts_only_label_tokens(tmp_path):
    import datasets

    from doge_cli.eval.sft_loss import assistant_token_loss
    from tests.chat.toymodel import GAP, forced_model, make_chat_tokenizer

    tok = make_chat_tokenizer(tmp_path / "tok")
    model = forced_model(tok, {100: 101, 101: 102})
    rows = {"input_ids": [[100, 101, 102, 7], [100, 55]], "labels": [[-100, 101, 102, -100], [-100, 55]]}
    split = datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})
    split.save_to_disk(str(tmp_path / "sft"))
    result = assistant_token_loss(model, tmp_path / "sft", batch_size=1)
    # Two forced tokens cost ~0, the unforced 55 costs GAP + log(1 + (V - 1) e^-GAP) ~ GAP.
    hard = GAP + math.log(1 + (model.config.vocab_size - 1) * math.exp(-GAP))
    assert result["tokens"] == 3 and result["rows"] == 2
    assert result["loss"] == pytest.approx(hard / 3, rel=1e-3)
    with pytest.raises(DogeError, match="no 'train' split"):
        assistant_token_loss(model, tmp_path / "sft", split="train")
