"""The tasks doge eval knows: names and groups, hub tasks offline, builtin sets."""

import pytest

from doge_cli.errors import DogeError
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
