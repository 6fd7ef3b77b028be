"""The engine: parity with transformers through every backend, continuous batching, shared prefill,
stops, log-probabilities, seeded sampling independent of neighbours, and collective pacing."""

from __future__ import annotations

import pytest
import torch

from doge_cli.inference import Engine, Request, SamplingParams, generate
from tests.model.doge_twin import BACKENDS, hf_twin, ours_from, skip_unavailable, tiny_config

GREEDY = SamplingParams(greedy=True, max_new_tokens=16)


def _pair(backend="sdpa", **overrides):
    hf = hf_twin(tiny_config(**{"eos_token_id": None, "keep_window_size": 12, **overrides}))
    return hf, ours_from(hf, backend)


def _prompts():
    gen = torch.Generator().manual_seed(8)
    return [torch.randperm(120, generator=gen)[:n].add(3).tolist() for n in (9, 5, 2, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_equals_transformers_for_every_backend_at_batch_1_and_4(backend):
    skip_unavailable(backend)
    hf, ours = _pair(backend, keep_window_size=128)  # no top-k: ties would follow different rules
    prompts = _prompts()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    out = generate(ours, ids, mask, max_new_tokens=64)
    assert torch.equal(out.sequences, ref)
    alone = generate(ours, ids[:1, -len(prompts[0]):], max_new_tokens=64)
    assert torch.equal(alone.new_tokens, out.new_tokens[:1])


def test_requests_that_join_later_get_what_they_get_alone():
    _, ours = _pair()
    prompts = _prompts()
    alone = []
    for p in prompts:
        request = Request(p, GREEDY)
        Engine(ours, max_batch=1).generate([request])
        alone.append(request.token_ids)
    engine = Engine(ours, max_batch=3)
    requests = [Request(p, GREEDY) for p in prompts]
    engine.submit(requests[0])
    engine.step()
    engine.step()  # the first request is two tokens ahead when the others join
    for request in requests[1:]:
        engine.submit(request)  # the fourth waits for a free row
    while not engine.idle():
        engine.step()
        assert len(engine.running) <= 3
    assert [r.token_ids for r in requests] == alone


def test_a_shared_prompt_is_prefilled_once_and_finished_rows_leave_the_batch(monkeypatch):
    from doge_cli.inference.decode import Decoder

    _, ours = _pair()
    prompt = _prompts()[0]
    prefills, decodes = [], []
    forward, step = ours.forward, Decoder.__call__
    monkeypatch.setattr(ours, "forward", lambda *a, **k: prefills.append(a[0].shape) or forward(*a, **k))
    monkeypatch.setattr(Decoder, "__call__", lambda self, tokens, *a: decodes.append(len(tokens)) or step(self, tokens, *a))
    sampled = [Request(prompt, SamplingParams(max_new_tokens=12, seed=i)) for i in range(3)]
    short = Request(prompt, SamplingParams(greedy=True, max_new_tokens=3))
    Engine(ours, max_batch=4).generate([*sampled, short])
    assert prefills == [(1, len(prompt))]  # one prefill row for four requests
    assert decodes == [4, 4] + [3] * 9  # the 3-token request left after its last token
    for i, request in enumerate(sampled):  # each sampled as it would alone
        alone = Request(prompt, SamplingParams(max_new_tokens=12, seed=i))
        Engine(ours, max_batch=1).generate([alone])
        assert request.token_ids == alone.token_ids


def test_stops_lengths_and_logprobs():
    _, ours = _pair()
    prompt = _prompts()[1]
    free = Request(prompt, SamplingParams(greedy=True, max_new_tokens=10), logprobs=True)
    Engine(ours).generate([free])
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop = free.token_ids[4]
    stopped = Request(prompt, SamplingParams(greedy=True, max_new_tokens=10), stop_token_ids=[stop])
    Engine(ours).generate([stopped])
    first = free.token_ids.index(stop)
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.finish_reason == "stop"
    with torch.no_grad():
        logits = ours(torch.tensor([prompt + free.token_ids])).logits[0, len(prompt) - 1:-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(free.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(free.token_logprobs), want, rtol=1e-4, atol=1e-4)


def test_stop_strings_and_streaming_with_a_tokenizer(tmp_path):
    from tests.chat.toymodel import make_chat_tokenizer

    tok = make_chat_tokenizer(tmp_path / "tok")
    _, ours = _pair(vocab_size=len(tok))
    prompt = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    full = Request(prompt, SamplingParams(greedy=True, max_new_tokens=20), stop_token_ids=[])
    Engine(ours, tok).generate([full])
    assert full.text == tok.decode(full.token_ids)
    cut_at = full.text[len(full.text) // 2:][:3]
    pieces = []
    cut = Request(prompt, SamplingParams(greedy=True, max_new_tokens=20), stop_token_ids=[], stop=[cut_at],
                  on_text=pieces.append)
    Engine(ours, tok).generate([cut])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(cut_at)]
    assert "".join(pieces) == cut.text


def test_requests_that_end_at_their_first_token_cost_one_forward(monkeypatch):
    """A reply of one token (or one that stops at its first) is the prefill and nothing else: no dropped
    forward after it (that one belongs to stop_together's pacing alone). It made one-token replies slower
    than two-token ones, and benchmarks/generation.py's first-token times with them."""
    from doge_cli.inference.decode import Decoder

    _, ours = _pair()
    calls, decodes = [], []
    forward, step = ours.forward, Decoder.__call__
    monkeypatch.setattr(ours, "forward", lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k))
    monkeypatch.setattr(Decoder, "__call__", lambda self, tokens, *a: decodes.append(len(tokens)) or step(self, tokens, *a))
    prompts = _prompts()
    one = [Request(p, SamplingParams(greedy=True, max_new_tokens=1)) for p in prompts[:2]]
    Engine(ours, max_batch=2).generate(one)
    assert [len(r.token_ids) for r in one] == [1, 1] and len(calls) == 1 and decodes == []
    # more requests than rows: each batch is one prefill, still nothing dropped
    calls.clear()
    many = [Request(p, SamplingParams(greedy=True, max_new_tokens=1)) for p in prompts]
    Engine(ours, max_batch=2).generate(many)
    assert all(len(r.token_ids) == 1 for r in many) and len(calls) == 2 and decodes == []


def test_a_process_whose_requests_are_done_keeps_pace_with_the_others(monkeypatch):
    """Under ZeRO-3 every forward is collective: until stop_together says every process is done, a
    process with nothing left runs forwards too (and its own results are unchanged)."""
    _, ours = _pair()
    prompt = _prompts()[1]
    calls = []
    forward = ours.forward
    monkeypatch.setattr(ours, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    asked = []

    def others_busy_until_8(done: bool) -> bool:
        asked.append(done)
        return len(asked) >= 8

    request = Request(prompt, SamplingParams(greedy=True, max_new_tokens=3))
    Engine(ours, max_batch=1, stop_together=others_busy_until_8).generate([request])
    assert len(request.token_ids) == 3 and asked == [False, False, True, True, True, True, True, True]
    assert len(calls) == 1 + 7  # the prefill, then one forward per step until everyone is done


def test_a_cancelled_request_frees_its_row_at_the_next_step():
    _, ours = _pair()
    prompts = _prompts()
    engine = Engine(ours, max_batch=2)
    first, second, third = (Request(p, SamplingParams(greedy=True, max_new_tokens=30)) for p in prompts[:3])
    for request in (first, second, third):
        engine.submit(request)
    engine.step()
    assert len(engine.running) == 2 and len(engine.queue) == 1
    first.cancelled = True  # e.g. its client disconnected
    done = engine.step()
    assert first in done and first.finish_reason == "cancelled"
    assert sorted(id(r.request) for r in engine.running) == sorted(map(id, (second, third)))  # the waiting one took the row
    while not engine.idle():
        engine.step()
    alone = Request(prompts[2], SamplingParams(greedy=True, max_new_tokens=30))
    Engine(ours, max_batch=1).generate([alone])
    assert third.token_ids == alone.token_ids


def test_a_request_whose_prefill_fails_fails_alone_and_the_others_go_on():
    """Before, the failure propagated out of step() with the running rows in it, so a server failed them all."""
    _, ours = _pair()
    good, other, third = _prompts()[:3]
    alone = []
    for prompt in (good, other, third):
        alone.append(Request(prompt, GREEDY))
        Engine(ours, max_batch=1).generate([alone[-1]])
    engine = Engine(ours, max_batch=4)
    running = Request(good, GREEDY)
    engine.submit(running)
    engine.step()
    bad = Request([5, ours.config.vocab_size + 7], GREEDY)  # a token id outside the vocabulary
    beside = Request(other, GREEDY)  # admitted in the same prefill as the bad one
    engine.submit(bad)
    engine.submit(beside)
    finished = engine.step()
    assert finished == [bad] and bad.finish_reason == "error" and bad.token_ids == []
    assert isinstance(bad.error, IndexError)
    later = Request(third, GREEDY)  # the engine still admits and decodes
    engine.submit(later)
    while not engine.idle():
        finished += engine.step()
    assert [r.token_ids for r in (running, beside, later)] == [a.token_ids for a in alone]
    assert all(r.error is None and r.finish_reason == "length" and r in finished for r in (running, beside, later))


def test_generate_raises_what_a_prefill_raised():
    _, ours = _pair()
    with pytest.raises(IndexError):
        Engine(ours, max_batch=2).generate([Request([5, ours.config.vocab_size + 7], GREEDY)])
