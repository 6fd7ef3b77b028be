"""The engine's own thread: requests in, text deltas and endings out, and failures kept to their requests."""

from __future__ import annotations

import asyncio
import re

import pytest

from doge_cli.inference import Engine, Request, SamplingParams
from doge_cli.serve.worker import EngineWorker, Ticket
from tests.chat.toymodel import make_chat_tokenizer


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    import torch
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM

    tok = make_chat_tokenizer(tmp_path_factory.mktemp("tok"))
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                        keep_window_size=128, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return DogeForCausalLM(config).eval(), tok


def greedy(ids, n=6):
    return Request(list(ids), SamplingParams(max_new_tokens=n, greedy=True), stop_token_ids=[])


async def collect(worker, requests):
    loop = asyncio.get_running_loop()
    tickets = [Ticket(r, loop) for r in requests]
    for t in tickets:
        worker.submit(t)

    async def drain(ticket):
        events = []
        while not events or events[-1][0] == "text":
            events.append(await asyncio.wait_for(ticket.events.get(), timeout=60))
        return events
    return await asyncio.gather(*(drain(t) for t in tickets))


def test_replies_match_the_engine_and_stream_their_text(model_and_tok):
    model, tok = model_and_tok
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    expected = Engine(model, tok, max_batch=1).generate([greedy(p) for p in prompts])
    worker = EngineWorker(lambda: Engine(model, tok, max_batch=2)).start()
    try:
        results = asyncio.run(collect(worker, [greedy(p) for p in prompts]))
    finally:
        worker.stop()
    for events, want in zip(results, expected):
        assert events[-1] == ("done", None)
        assert "".join(v for k, v in events if k == "text") == want.text
    assert not worker.thread.is_alive()


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on(model_and_tok):
    model, tok = model_and_tok
    built = []

    class Broken(Engine):
        def step(self):
            raise RuntimeError("kernel exploded")

    def make():
        built.append(1)
        return (Broken if len(built) == 1 else Engine)(model, tok, max_batch=2)

    worker = EngineWorker(make).start()
    try:
        first = asyncio.run(collect(worker, [greedy([1, 2])]))[0]
        # the client gets an error id, never the exception's text (the log has it)
        ((kind, message),) = first
        assert kind == "error" and re.fullmatch(r"generation failed \(error [0-9a-f]{8}; the server's log has the "
                                                r"details\)", message), message
        assert "exploded" not in message
        second = asyncio.run(collect(worker, [greedy([1, 2])]))[0]
        assert second[-1] == ("done", None) and len(built) == 2
    finally:
        worker.stop()


def test_a_request_whose_prefill_fails_fails_alone_while_a_stream_goes_on(model_and_tok, caplog):
    """Before, the prefill's error failed every running request (a stream lost its end) and the engine was
    rebuilt."""
    model, tok = model_and_tok
    long = greedy([1, 2, 3], n=40)
    expected = Engine(model, tok, max_batch=1).generate([greedy([1, 2, 3], n=40)])[0]
    built = []

    def make():
        built.append(1)
        return Engine(model, tok, max_batch=3)

    worker = EngineWorker(make)
    bad = greedy([4, len(tok) + 9])  # a token id outside the vocabulary
    bad.id = "chatcmpl-bad"

    async def scenario():
        loop = asyncio.get_running_loop()
        stream, broken = Ticket(long, loop), Ticket(bad, loop)
        worker.submit(stream)
        worker.engine.submit(long)  # as the loop would: the stream is running when the bad one comes
        worker.tickets[id(long)] = stream
        worker.inbox.get_nowait()
        worker.engine.step()
        worker.submit(broken)
        worker.start()
        events = [[], []]
        for ticket, out in zip((stream, broken), events):
            while not out or out[-1][0] == "text":
                out.append(await asyncio.wait_for(ticket.events.get(), timeout=60))
        return events

    try:
        with caplog.at_level("ERROR", logger="doge_cli.serve.worker"):
            streamed, failed = asyncio.run(scenario())
        assert worker.load() == {"generating": 0, "queued": 0}
    finally:
        worker.stop()
    assert streamed[-1] == ("done", None) and "".join(v for k, v in streamed if k == "text") == expected.text
    ((kind, message),) = failed
    error_id = re.fullmatch(r"generation failed \(error ([0-9a-f]{8}); the server's log has the details\)", message)
    assert kind == "error" and error_id, message
    (record,) = caplog.records
    assert "chatcmpl-bad" in record.getMessage() and error_id.group(1) in record.getMessage()
    assert record.exc_info[0] is IndexError  # the traceback is in the log
    assert len(built) == 1  # the same engine went on


def test_a_request_the_engine_refuses_gets_an_error_and_others_run(model_and_tok):
    model, tok = model_and_tok
    worker = EngineWorker(lambda: Engine(model, tok, max_batch=2)).start()
    try:
        bad, good = asyncio.run(collect(worker, [greedy([]), greedy([3, 4])]))
    finally:
        worker.stop()
    assert bad == [("error", "ValueError: a request needs at least one prompt token")]
    assert good[-1] == ("done", None)


def test_a_cancelled_request_ends_without_generating(model_and_tok):
    model, tok = model_and_tok
    request = greedy([1, 2, 3], n=50)
    request.cancelled = True
    worker = EngineWorker(lambda: Engine(model, tok, max_batch=2)).start()
    try:
        events = asyncio.run(collect(worker, [request]))[0]
    finally:
        worker.stop()
    assert events == [("done", None)] and request.finish_reason == "cancelled" and request.token_ids == []


def test_close_ends_running_queued_and_later_requests_with_its_message(model_and_tok):
    model, tok = model_and_tok
    worker = EngineWorker(lambda: Engine(model, tok, max_batch=1))

    async def scenario():
        loop = asyncio.get_running_loop()
        running, queued = Ticket(greedy([1, 2], n=5), loop), Ticket(greedy([3, 4], n=5), loop)
        worker.submit(running)
        worker.submit(queued)
        worker.engine.submit(running.request)  # as the loop would have: one admitted, one still in the inbox
        worker.tickets[id(running.request)] = running
        worker.inbox.get_nowait()
        worker.close("the server is shutting down")
        later = Ticket(greedy([5]), loop)
        worker.submit(later)
        return [await asyncio.wait_for(t.events.get(), timeout=5) for t in (running, queued, later)]

    events = asyncio.run(scenario())
    assert events == [("error", "the server is shutting down")] * 3
    assert worker.inbox.empty()


def test_requests_that_arrive_with_the_stop_are_ended_by_close(model_and_tok):
    """A ticket in the same inbox batch as the stop was dropped: its client waited for ever."""
    model, tok = model_and_tok
    worker = EngineWorker(lambda: Engine(model, tok, max_batch=1))

    async def scenario():
        loop = asyncio.get_running_loop()
        ticket = Ticket(greedy([1, 2], n=5), loop)
        worker.submit(ticket)
        worker.inbox.put(None)  # the stop, in the same batch as the ticket
        worker.run()  # returns at the stop, in this thread
        worker.close("the server is shutting down")
        return await asyncio.wait_for(ticket.events.get(), timeout=5)

    assert asyncio.run(scenario()) == ("error", "the server is shutting down")
