"""``doge serve`` through the official ``openai`` client and raw HTTP, against a server in a subprocess."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from .conftest import API_KEY, CONTEXT, log_mark, wait_for_line, wait_for_log

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def client(server, key: str = "none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(served):
    """The served model and tokenizer, loaded in this process: doge's own generation to compare with."""
    from doge_cli.chat.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(served.model_dir), device="cpu")


def own_chat_reply(local, messages, max_new_tokens: int) -> str:
    from doge_cli.chat.session import ChatSession
    from doge_cli.inference import SamplingParams

    model, tok = local
    session = ChatSession(model, tok, system=messages[0]["content"],
                          params=SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    return session.reply(messages[1]["content"])


def stream_chat(server, messages, max_tokens: int, **extra) -> tuple[str, set[str], list]:
    """Streamed content joined, the ids of the chunks, and the chunks."""
    chunks = list(client(server).chat.completions.create(model=server.name, messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, {c.id for c in chunks}, chunks


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_lists_the_served_name(served):
    api = client(served)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    card = api.models.retrieve("tiny")
    assert card.owned_by == "doge" and card.model_extra == {"max_model_len": CONTEXT, "max_new_tokens": 4000}
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and {"generating", "queued", "admitted"} <= set(health)


def test_a_vanishing_temperature_is_greedy_not_nan(served, local):
    """temperature 1e-45 once overflowed the logits to NaN and picked the last token id."""
    reply = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1e-45)
    assert reply.choices[0].message.content == own_chat_reply(local, MESSAGES, 12)


def test_greedy_chat_equals_doges_own_generation(served, local):
    reply = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == own_chat_reply(local, MESSAGES, 20)
    assert reply.choices[0].finish_reason == "length"
    model, tok = local
    from doge_cli.chat_format import prompt_ids

    assert reply.usage.prompt_tokens == len(prompt_ids(tok, MESSAGES))
    assert reply.usage.completion_tokens == 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 20


def test_stream_joins_to_the_content_under_one_id(served):
    whole = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    text, ids, chunks = stream_chat(served, MESSAGES, 12, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert len(ids) == 1 and ids != {whole.id}  # one id per response
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # the usage chunk comes last
    assert chunks.index(finals[0]) == len(chunks) - 2


def test_max_tokens_gives_length_and_that_many_tokens(served):
    reply = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8


def test_stop_string_cuts_the_reply(served):
    full = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                                  temperature=0).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a piece from the middle of the greedy reply
    assert stop and full.find(stop) > 0
    reply = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                   stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[:full.find(stop)]
    text, _, chunks = stream_chat(served, MESSAGES, 24, stop=stop)
    assert text == full[:full.find(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_raw_stream_ends_with_done(served):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_completions_continue_a_raw_prompt(served, local):
    from doge_cli.inference import Engine, Request, SamplingParams

    model, tok = local
    prompt = "The history of"
    ids = tok(prompt)["input_ids"]
    request = Request(ids, SamplingParams(max_new_tokens=10, greedy=True))
    Engine(model, tok, max_batch=1).generate([request])
    reply = client(served).completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == request.text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 10
    streamed = client(served).completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == request.text
    assert chunks[-1].choices[0].finish_reason == "length" and len({c.id for c in chunks}) == 1


def test_default_completion_length_is_openais(served):
    reply = client(served).completions.create(model="tiny", prompt="A", temperature=0)
    assert reply.usage.completion_tokens == 16


def test_seeded_sampling_repeats(served):
    def sample(seed):
        return client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                      top_p=0.95, seed=seed).choices[0].message.content
    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def _post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 4001}, "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "n": 2}, None),
    ({"model": "tiny", "messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "frobnicate": True}, "frobnicate"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": MESSAGES}, "model"),
    ({"model": "tiny", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_chat_requests_are_400(served, body, param):
    error = _error(_post(served, "/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_prompt_longer_than_the_context_is_400(served):
    long = {"role": "user", "content": "tick " * CONTEXT}
    error = _error(_post(served, "/v1/chat/completions", {"model": "tiny", "messages": [long]}), 400)
    assert error["code"] == "context_length_exceeded"
    error = _error(_post(served, "/v1/chat/completions",
                         {"model": "tiny", "messages": [{"role": "user", "content": "tick " * 300}],
                          "max_tokens": 4000}), 400)
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client(served).completions.create(model="tiny", prompt="tick " * CONTEXT)


def test_unknown_model_and_path_are_404(served):
    error = _error(_post(served, "/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="gpt-4", messages=MESSAGES)
    _error(httpx.get(served.url + "/v1/nothing-here"), 404)


def test_bodies_that_are_not_requests_are_400(served):
    for raw in (b"{not json", b"[1, 2]", b""):
        _error(httpx.post(served.url + "/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}), 400)


def test_oversized_bodies_are_413(served):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert _error(_post(served, "/v1/chat/completions", big), 413)["code"] == "request_too_large"
    chunked = (json.dumps(big)[i:i + 65536].encode() for i in range(0, len(json.dumps(big)), 65536))
    response = httpx.post(served.url + "/v1/chat/completions", content=chunked,
                          headers={"content-type": "application/json"})
    assert _error(response, 413)["code"] == "request_too_large"
    assert httpx.get(served.url + "/health").status_code == 200  # and the server is still up


def _alone_and_together(server, prompts: list[str]) -> None:
    def messages(p):
        return [{"role": "user", "content": p}]

    alone = [stream_chat(server, messages(p), 24)[0] for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def run(i):
        together[i] = stream_chat(server, messages(prompts[i]), 24)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone


def test_two_concurrent_streams_match_their_solo_runs(served):
    _alone_and_together(served, ["Name a colour.", "What is the longest river in the world?"])


def test_eight_concurrent_streams_match_their_solo_runs(served):
    prompts = ["hi", "Tell me a story about a dog.", "2+2?", "What is Python used for, in one line?",
               "Translate 'cat' to French.", "Why is the sky blue? Explain in detail.", "ok", "List three fruits."]
    _alone_and_together(served, prompts)


def test_a_client_that_goes_away_frees_its_slot(served):
    before = log_mark(served)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first generated text arrived: hang up
    line = wait_for_line(served, before, "/v1/chat/completions")
    assert line.split()[1:4] == ["POST", "/v1/chat/completions", "200"]
    assert int(line.split()[4]) < 4000 and "client went away" in line
    # the server goes on serving
    # greedy: this model never prefers end-of-turn, so exactly 3 tokens (sampled, it may end at once)
    again = client(served).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert again.usage.completion_tokens == 3


def test_one_log_line_per_request_without_prompt_text(served):
    before = log_mark(served)
    secret = "zebra-quantum-marmalade"
    client(served).chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret}], max_tokens=4,
                                           temperature=0)  # greedy: exactly 4 tokens
    httpx.get(served.url + "/health")
    lines = wait_for_log(served, before + 2)[before:]
    assert len(lines) == 2
    _, method, path, status, tokens, word, seconds, request_id = lines[0].split()
    assert (method, path, status, tokens, word) == ("POST", "/v1/chat/completions", "200", "4", "tokens")
    assert float(seconds.removesuffix("s")) >= 0
    assert re.fullmatch("chatcmpl-[0-9a-f]{32}", request_id)  # the id the worker's lines about it carry
    assert lines[1].split()[1:5] == ["GET", "/health", "200", "0"] and len(lines[1].split()) == 7
    assert secret not in served.log.read_text()


# ------------------------------------------------------------------------------ R1 model, API key


def test_the_key_is_required_and_checked(r1_served):
    _error(httpx.get(r1_served.url + "/v1/models"), 401)
    error = _error(httpx.get(r1_served.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(r1_served, key="wrong").models.list()
    assert [m.id for m in client(r1_served, key=API_KEY).models.list().data] == ["doge-r1"]
    assert httpx.get(r1_served.url + "/health").status_code == 200  # health and the page need no key
    page = httpx.get(r1_served.url + "/")
    assert page.status_code == 200 and "doge-r1" not in page.text  # ... but the page names the model only to
    # whoever has the key (it reads it from /v1/models)


def test_r1_thinking_comes_apart_from_the_answer(r1_served):
    api = client(r1_served, key=API_KEY)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    reply = api.chat.completions.create(model="doge-r1", messages=messages, temperature=0)
    message = reply.choices[0].message
    assert message.content == "4"
    assert message.model_extra["reasoning_content"] == "the"
    assert reply.choices[0].finish_reason == "stop"  # end of turn
    chunks = list(api.chat.completions.create(model="doge-r1", messages=messages, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "4"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "the"
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------ reply splitting


@pytest.mark.parametrize("text, thinking, answer", [
    ("  plain reply ", "", "  plain reply "),  # no thinking: passed on as generated
    ("<|begin_of_thought|> add them <|end_of_thought|>\n\n<|begin_of_solution|>4<|end_of_solution|>",
     "add them ", "4"),
    ("<|begin_of_thought|>still thinking <|begin_of", "still thinking <|begin_of", ""),
    ("a < b <| not a marker", "", "a < b <| not a marker"),
])
def test_replies_split_the_same_whole_or_streamed(text, thinking, answer):
    from doge_cli.serve.app import _ReplySplitter

    def joined(parts, key):
        return "".join(t for k, t in parts if k == key)

    whole = _ReplySplitter()
    parts = whole.feed(text) + whole.flush()
    assert (joined(parts, "reasoning_content"), joined(parts, "content")) == (thinking, answer)
    for size in (1, 3, 7):
        split = _ReplySplitter()
        streamed = [p for i in range(0, len(text), size) for p in split.feed(text[i:i + size])] + split.flush()
        assert joined(streamed, "reasoning_content") == thinking and joined(streamed, "content") == answer


def test_the_access_log_cannot_be_given_forged_lines(served):
    """GET /v1/x%0AFORGED... once wrote a log line beginning FORGED."""
    import httpx

    from .conftest import log_mark, wait_for_line

    after = log_mark(served)
    httpx.get(served.url + "/v1/x%0AFORGED%20GET%20/v1/models%20200%1b[31m", timeout=30)
    line = wait_for_line(served, after, "FORGED")
    assert "/v1/x\\nFORGED GET /v1/models 200\\x1b[31m" in line, line
    assert not any(ln.startswith("FORGED") for ln in served.log_lines())


def test_connections_beyond_max_connections_get_503_until_one_closes(served):
    """--max-connections 32 (the fixture's): with 32 connections open, a request on one more is refused."""
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(32)]
    try:
        assert httpx.get(served.url + "/health", timeout=30).status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30  # other tests' idle keep-alive connections close within uvicorn's 5 s
    while (status := httpx.get(served.url + "/health", timeout=30).status_code) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
