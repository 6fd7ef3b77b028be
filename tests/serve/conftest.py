"""Servers for the serve tests: ``doge serve`` in a subprocess on a free port, over two tiny models.

- ``served``: a random Doge (fp32) with a 4096-token context whose LM head never prefers end-of-turn, so
  a greedy reply runs to ``max_tokens`` (a long one can be cut off by its client mid-way).
- ``r1_served``: a forced R1 model (every reply ``<thought> the </thought><solution>4</solution>``),
  behind an API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chat.toymodel import make_chat_tokenizer, save_forced_r1_model

API_KEY = "test-key-123"
CONTEXT = 4096


@dataclass
class Server:
    url: str
    model_dir: Path
    log: Path
    name: str
    process: subprocess.Popen

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def save_random_model(root: Path) -> Path:
    import torch
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    tok = make_chat_tokenizer(root / "tokenizer")
    config = DogeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                        keep_window_size=CONTEXT, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = DogeForCausalLM(config)
    with torch.no_grad():  # end-of-turn's logit is 0 whatever the input: below the largest of the others
        model.lm_head.weight[tok.eos_token_id].zero_()
    return save_pretrained(model, root / "model", tokenizer=tok)


def start_server(model_dir: Path, log: Path, *args: str) -> Server:
    """``doge serve MODEL --port 0 ...`` in a subprocess; returns once it printed its URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    name = args[args.index("--served-name") + 1] if "--served-name" in args else Path(model_dir).resolve().name
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "doge_cli", "serve", str(model_dir), "--port", "0", *args],
                                   stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=180)
    if not lines or "http://" not in lines[0]:
        process.kill()
        raise RuntimeError(f"doge serve did not start: {lines!r}\n{log.read_text()}")
    url = lines[0].split("http://", 1)[1].split()[0].rstrip("/")
    return Server(f"http://{url}", model_dir, log, name, process)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def wait_for_log(server: Server, count: int, timeout: float = 60) -> list[str]:
    """The log's lines once it has at least ``count`` (requests log when their response ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = server.log_lines()
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"the server logged {len(server.log_lines())} lines, expected {count}")


def wait_for_line(server: Server, after: int, contains: str, timeout: float = 60) -> str:
    """The first log line after line ``after`` that contains ``contains``, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log_lines()[after:]:
            if contains in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"the server logged no line with {contains!r} after line {after}")


def log_mark(server: Server, timeout: float = 60) -> int:
    """The number of log lines up to a marker request of this call's own (a 404 for a made-up model
    name, which the log line names), so that lines after it belong to requests made after it: a request
    an earlier test made is logged when its response ends, which can be just after its client has it."""
    import uuid

    import httpx

    marker = f"/v1/models/log-mark-{uuid.uuid4().hex}"
    httpx.get(server.url + marker, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = server.log_lines()
        for index, line in enumerate(lines):
            if marker in line:
                return index + 1
        time.sleep(0.05)
    raise AssertionError(f"the server never logged the marker request {marker}")


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    server = start_server(save_random_model(root), root / "server.log", "--served-name", "tiny",
                          "--max-batch", "8", "--max-new-tokens", "4000", "--max-connections", "32")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def r1_served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-r1")
    server = start_server(save_forced_r1_model(root), root / "server.log", "--served-name", "doge-r1",
                          "--api-key", API_KEY)
    yield server
    stop_server(server)
