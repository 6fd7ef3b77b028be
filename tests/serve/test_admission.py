"""--max-queue: beyond max_batch + max_queue requests, 429 with Retry-After in OpenAI's shape, and the place
comes back when an answer ends, however it ends (in-process, with a stand-in worker that holds its tickets)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.chat.toymodel import make_chat_tokenizer


class HoldingWorker:
    """Keeps every ticket until the test ends it."""

    def __init__(self):
        self.tickets = []

    def submit(self, ticket):
        self.tickets.append(ticket)

    def load(self):
        return {"generating": len(self.tickets), "queued": 0}


@pytest.fixture()
def app_and_worker(tmp_path):
    import torch
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM
    from doge_cli.serve.app import create_app

    tok = make_chat_tokenizer(tmp_path / "tok")
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                        keep_window_size=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    worker = HoldingWorker()
    app = create_app(DogeForCausalLM(config).eval(), tok, served_name="tiny", max_batch=1, max_queue=1,
                     worker=worker)
    return app, worker, tok


BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 2}


def wait_for_tickets(worker, n):
    deadline = time.monotonic() + 30
    while len(worker.tickets) < n:
        assert time.monotonic() < deadline, f"{len(worker.tickets)} tickets, expected {n}"
        time.sleep(0.01)


def test_beyond_the_queue_is_429_with_retry_after_and_places_come_back(app_and_worker):
    from fastapi.testclient import TestClient

    app, worker, _ = app_and_worker
    with TestClient(app) as client:
        for _ in range(3):  # admitted, then refused by the request's own check: the place comes back each time
            assert client.post("/v1/completions", json={**BODY, "max_tokens": 10**6}).status_code == 400
        answers = []
        held = [threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=BODY)))
                for _ in range(2)]
        for thread in held:  # max_batch 1 + max_queue 1: two places
            thread.start()
        wait_for_tickets(worker, 2)
        health = client.get("/health").json()  # checked once the held requests are let go (a failed assert
        # here would leave them, and the client's shutdown, waiting)
        busy = client.post("/v1/completions", json=BODY)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "2"
        assert busy.json()["error"]["code"] == "server_busy" and "--max-queue" in busy.json()["error"]["message"]
        assert len(worker.tickets) == 2  # the refused request never reached the engine
        # a request refused for its own fault takes no place either
        assert client.post("/v1/completions", json={**BODY, "seed": 2**64}).status_code == 400
        for ticket in worker.tickets:  # the held requests end (here with an error)...
            ticket._put(("error", "stopped by the test"))
        for thread in held:
            thread.join(timeout=30)
        assert [a.status_code for a in answers] == [500, 500]
        third = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=BODY)))
        third.start()  # ... and their places are free again
        wait_for_tickets(worker, 3)
        worker.tickets[2]._put(("error", "stopped by the test"))
        third.join(timeout=30)
        assert answers[-1].status_code == 500
        assert client.get("/health").json()["admitted"] == 0
    assert health == {"status": "ok", "generating": 2, "queued": 0, "admitted": 2}


def test_prompts_are_rendered_and_tokenized_off_the_event_loop(app_and_worker, monkeypatch):
    """A 1 MiB prompt takes about a second to tokenize; on the event loop that stalled every stream."""
    import asyncio

    from fastapi.testclient import TestClient

    app, worker, tok = app_and_worker
    tokenizer_type = type(tok)
    on_loop = []

    def watching(method):
        def wrapper(self, *args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(method.__name__)
            except RuntimeError:  # no loop in this thread: a worker thread
                on_loop.append(None)
            return method(self, *args, **kwargs)
        return wrapper

    for name in ("__call__", "apply_chat_template"):
        monkeypatch.setattr(tokenizer_type, name, watching(getattr(tokenizer_type, name)))
    with TestClient(app) as client:
        for path, body in (("/v1/completions", BODY),
                           ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})):
            answer, before = [], len(worker.tickets)
            thread = threading.Thread(target=lambda out=answer, path=path, body=body:
                                      out.append(client.post(path, json=body)))
            thread.start()
            wait_for_tickets(worker, before + 1)
            worker.tickets[-1]._put(("done", None))
            thread.join(timeout=30)
            assert answer[0].status_code == 200
    assert on_loop and set(on_loop) == {None}, on_loop
