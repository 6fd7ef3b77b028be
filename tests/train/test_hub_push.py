"""hub.push during training, against the local stand-in for the hub (no network): every_save pushes each
checkpoint and the final model with its card; a refused push is said and the run finishes untouched; no
hub access or no token refuses the run before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT, tiny_overrides

pytest.importorskip("fastapi")
from tests.hub_standin import REFUSED, standin_hub  # noqa: E402


def train(pt_data, out, endpoint, home, repo, **env):
    environ = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_TOKEN": "hf_test_token",
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
               "DOGE_PLAIN_LOGS": "1", **env}
    environ = {k: v for k, v in environ.items() if v is not None}
    overrides = tiny_overrides(pt_data, out, steps=4, **{"checkpoint.every": 2, "hub.push": "true",
                                                         "hub.repo": repo, "hub.strategy": "every_save"})
    return subprocess.run([sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu", *overrides],
                          env=environ, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_every_save_pushes_each_checkpoint_and_the_final_model(pt_data, tmp_path):
    from huggingface_hub import ModelCard

    with standin_hub() as (url, state):
        done = train(pt_data, tmp_path / "run", url, tmp_path, "me/doge-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c["summary"] for c in state["commits"]] == ["doge: checkpoint at step 2",
                                                        "doge: final model after 4 steps"]
    for commit in state["commits"]:
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(commit["files"])
    final = state["commits"][-1]["files"]
    assert final["model.safetensors"] == (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    card = ModelCard(final["README.md"].decode())
    assert card.data.library_name == "transformers" and "| steps | 4 / 4 |" in card.text
    assert done.stdout.count("pushed to me/doge-run:") == 2


def test_a_refused_push_is_said_and_the_run_finishes(pt_data, tmp_path):
    with standin_hub() as (url, state):
        done = train(pt_data, tmp_path / "run", url, tmp_path, REFUSED)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"hub push to {REFUSED} failed (the hub refused the push") == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "commits" not in state


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "pushing to the hub needs hub access, and HF_HUB_OFFLINE is set"),
    ({"HF_TOKEN": None}, "no Hugging Face token"),
])
def test_no_hub_access_or_token_refuses_the_run_before_it_starts(pt_data, tmp_path, env, message):
    with standin_hub() as (url, state):
        done = train(pt_data, tmp_path / "run", url, tmp_path, "me/doge-run", **env)
    assert done.returncode == 2 and done.stderr.strip().startswith(f"doge: error: {message}")
    assert not (tmp_path / "run").exists() and "commits" not in state
