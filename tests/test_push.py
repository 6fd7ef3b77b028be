"""doge push against a local stand-in for the hub's HTTP API (no network): the right repo, privacy flag,
branch and files are sent, the card parses, and the uploaded folder loads in transformers with the same
logits. Offline, without a token, or refused by the hub: one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.chat.toymodel import make_chat_tokenizer

pytest.importorskip("fastapi")
from tests.hub_standin import REFUSED, standin_hub  # noqa: E402


@pytest.fixture(scope="module")
def hub():
    with standin_hub() as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: doge_run.json, config.yaml, metrics.jsonl and final/ (a tiny chat model)."""
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    root = tmp_path_factory.mktemp("push")
    tok = make_chat_tokenizer(root / "tok")
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        keep_window_size=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    run = root / "run"
    save_pretrained(DogeForCausalLM(config).eval(), run / "final", tokenizer=tok)
    (run / "doge_run.json").write_text(json.dumps({"stage": "sft", "doge_version": "0.1.0"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "init_from": "SmallDoge/Doge-20M",
                                                     "train": {"max_steps": 2}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 3.25, "tokens": 100, "time_s": 2.0}) + "\n")
    evals = root / "eval"
    evals.mkdir()
    (evals / "r.json").write_text(json.dumps({"model": str(run / "final"), "tasks": {"arithmetic": {"em": 0.5}}}))
    return run, evals


def doge_push(args: list[str], endpoint: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_TOKEN": "hf_test_token",
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", **env}
    environ = {k: v for k, v in environ.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "doge_cli", "push", *args], env=environ, capture_output=True,
                          text=True, timeout=300)


def test_a_push_sends_the_repo_privacy_branch_files_and_a_card(hub, run_dir, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    url, state = hub
    state.clear()
    run, evals = run_dir
    done = doge_push([str(run), "--repo", "me/doge-tiny", "--private", "--revision", "exp", "--eval", str(evals)],
                     url, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"pushed {run} to me/doge-tiny: {url}/me/doge-tiny/commit/{'a' * 40}"
    assert state["create"] == {"name": "doge-tiny", "organization": "me", "visibility": "private"}
    assert state["token"] == "Bearer hf_test_token"
    assert state["branch"] == "exp" and [c["path"] for c in state["commits"]] == ["api/models/me/doge-tiny/commit/exp"]
    sent = state["commits"][0]["files"]
    assert set(sent) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                         "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # no doge marker
    card = ModelCard(sent["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and card.data.base_model == "SmallDoge/Doge-20M"
    assert "| final train loss | 3.2500 |" in card.text and "| arithmetic em | 0.5 |" in card.text
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, data in sent.items():
        (uploaded / name).write_bytes(data)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(uploaded).eval()(ids).logits
        local = AutoModelForCausalLM.from_pretrained(run / "final").eval()(ids).logits
    assert torch.equal(theirs, local)


@pytest.mark.parametrize("case, env, expected", [
    ("offline", {"HF_HUB_OFFLINE": "1"}, "pushing to the hub needs hub access, and HF_HUB_OFFLINE is set"),
    ("no-token", {"HF_TOKEN": None}, "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"),
])
def test_offline_or_without_a_token_nothing_is_sent(hub, run_dir, tmp_path, case, env, expected):
    url, state = hub
    state.clear()
    done = doge_push([str(run_dir[0]), "--repo", "me/doge-tiny"], url, tmp_path, **env)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"doge: error: {expected}")
    assert not [c for c in state.get("calls", []) if c[1] != "/api/agent-harnesses"]


def test_a_refusal_by_the_hub_is_one_line(hub, run_dir, tmp_path):
    url, state = hub
    state.clear()
    done = doge_push([str(run_dir[0]), "--repo", REFUSED], url, tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("doge: error: the hub refused the push (") and "403" in done.stderr
    assert "commits" not in state
