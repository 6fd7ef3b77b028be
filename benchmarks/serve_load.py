"""``doge serve`` under load and under attack at once, for a bounded time: what must still hold.

One server (``doge serve`` in a subprocess on 127.0.0.1, ``--max-batch 8 --max-queue 24``) over a
random-weight Doge of the given size with a real BPE tokenizer, built as benchmarks/serve.py builds it.
First every distinct request of the run (4 prompt lengths x ``max_tokens`` 8/32/64/128, greedy) is sent
alone, one at a time: the reference replies. A warm-up then sends a few 1 MiB prompts at once
(LoadRun.warm_up), after which the server's threads are counted. Then, for ``--seconds``, all at once:

- ``--clients`` streaming clients send those requests one after another, honouring Retry-After on a 429;
- every quarter of the run, a burst of max_batch + max_queue more of them at once, past the queue's limit;
- misbehaving clients: seeds outside [-2**63, 2**64 - 1] (expect 400), invalid JSON (400), a body one byte
  over 1 MiB (413), a valid body just under 1 MiB whose prompt is far past the context (400
  context_length_exceeded), clients that read two chunks of a long stream and hang up, and clients that
  read one chunk of a long stream and then stop reading for a third of the run before they close (with a
  small receive buffer, so that the server's writes back up once the stream outgrows the buffers on the
  way: ~250 KB for 1024 tokens, not the 1M size's ~50 KB). The last three take a place in the queue, so
  they may get 429 instead; they ask again 0.25 s later until they get in.

Checks (any failure makes the exit status 1): every well-formed request completed (a finish_reason and
``[DONE]``) or got 429 with Retry-After, never a 5xx or a broken stream; every completed reply equals its
reference; the bursts got some 429s; every misbehaving request got its expected status; the server's RSS
at the end is within 10% of its RSS 10 s in (--quick: 25%, 2.5 s in); its thread count after the run is
no higher than before it; ``/health`` reports no request generating, queued or admitted once the clients
are gone; the server's log has no traceback; it exits 0 on SIGTERM afterwards. Reported besides: tokens/s
of the completed replies over the load phase's wall time (a request under way at the deadline is finished,
not cut), time to first token (the first chunk with text, queueing included) p50 and p99, the longest
pause inside one stream, the statuses of everything sent, and the CPU the server and the clients used
(they share the machine's cores).

    .venv/bin/python benchmarks/serve_load.py [--quick] [--size 20M] [--clients 64] [--seconds 60]
                                              [--max-batch 8] [--max-queue 24]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).with_name("serve.py"))
serve_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_bench)

NAME = "bench"  # the served model's name
CONTEXT_TEXT = ("The harbour town wakes early: boats leave before dawn, the market opens at six, and by noon the "
                "square is full of people selling fish, bread, rope and paint while gulls watch from the roofs. ")
TIMEOUT_S = 120  # for any one request, queueing included: past it the request counts as unanswered
# Idle connections are dropped well before uvicorn closes them (after 5 s): a request sent on one that the
# server is closing at that moment gets no answer, which is the client's race, not the server's fault.
KEEPALIVE_S = 2
LOADS = ("generating", "queued", "admitted")  # /health's requests in engine rows, waiting for one, holding a place
# The answers each kind of misbehaving request may get: one that passes validation takes a place in the
# admission queue before anything else, so it may be refused with 429 instead when every place is taken.
EXPECTED = {
    "seed out of range": {"400"},
    "invalid JSON": {"400"},
    "body 1 byte over 1 MiB": {"413 request_too_large"},
    "1 MiB prompt": {"400 context_length_exceeded", "429 server_busy"},
    "hang up mid-stream": {"200", "429 server_busy"},
    "stop reading": {"200", "429 server_busy"},
}


@dataclass(frozen=True)
class Plan:
    clients: int
    seconds: float
    max_batch: int
    max_queue: int
    prompt_words: tuple[int, ...]  # words of context before each prompt's question: the prompt lengths
    max_tokens: tuple[int, ...]
    long_tokens: int  # max_tokens of the streams that are hung up on or left unread
    rss_bound: float  # the RSS may grow by this fraction between its two readings

    @property
    def hold(self) -> float:
        """How long a client that stops reading leaves its stream unread."""
        return self.seconds / 3

    @property
    def rss_at(self) -> float:
        """Seconds into the load at which the first RSS is read."""
        return min(10.0, self.seconds / 4)


def make_prompts(words: tuple[int, ...]) -> list[str]:
    """One prompt per length: ``n`` words of context, then one of benchmarks/serve.py's questions."""
    filler = CONTEXT_TEXT.split()
    prompts = []
    for index, n in enumerate(words):
        context = " ".join(filler[i % len(filler)] for i in range(n))
        question = serve_bench.PROMPTS[index % len(serve_bench.PROMPTS)]
        prompts.append(f"{context}\n\n{question}" if context else question)
    return prompts


def chat_body(prompt: str, max_tokens: int, **extra) -> dict:
    """A greedy streaming chat request that asks for usage in its last chunk."""
    return {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}


def start_server(model: Path, log: Path, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    """``doge serve`` on a free port of 127.0.0.1 with this run's limits; (process, base URL). Not
    benchmarks/serve.py's start_server: that one fixes ``--max-batch 8`` and has no ``--max-queue``."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "doge_cli", "serve", str(model), "--port", "0",
                                 "--served-name", NAME, "--max-batch", str(max_batch), "--max-queue",
                                 str(max_queue), "--no-ui"], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=serve_bench.ENV)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"doge serve did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, "http://" + line.split("http://", 1)[1].split()[0].rsplit("/v1", 1)[0].rstrip("/")


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM; the exit status, or None when the server had not exited 30 s later (it is killed then)."""
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status (Linux), e.g. ``VmRSS`` ("123456 kB") and ``Threads``."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def rss_mib(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def answer_label(status: int, retry_after: str | None, body: bytes) -> str:
    """An answer as the report counts it: the status and the error's code, e.g. ``400
    context_length_exceeded``; a 429 without a Retry-After header says so."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    label = f"{status} {code}" if code else str(status)
    return label + (" without Retry-After" if status == 429 and retry_after is None else "")


@dataclass
class Reply:
    """How one well-formed streaming request ended."""

    request: int  # index into the run's distinct requests
    source: str  # "client", "burst" or "reference"
    label: str = "no answer"
    retry_after: str | None = None
    text: str = ""
    finish_reason: str | None = None
    done: bool = False  # "data: [DONE]" arrived
    tokens: int = 0  # completion_tokens of the usage chunk
    ttft: float | None = None
    longest_gap: float = 0.0  # the longest pause between two chunks with text
    problem: str | None = None  # a transport error, an error event, an unreadable chunk
    end: float = 0.0  # the event loop's time when it ended

    @property
    def completed(self) -> bool:
        return self.label == "200" and self.done and self.finish_reason is not None and self.problem is None

    @property
    def acceptable(self) -> bool:
        return self.completed or self.label == "429 server_busy"


async def stream_chat(http: httpx.AsyncClient, request: int, body: dict, source: str) -> Reply:
    """Send one streaming chat request and read its answer to the end."""
    reply = Reply(request, source)
    started = time.perf_counter()
    last_text = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            reply.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                reply.label = answer_label(response.status_code, reply.retry_after, await response.aread())
                return reply
            reply.label = "200"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    reply.done = True
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    reply.problem = f"error event: {event['error'].get('message')}"
                    continue
                if event.get("usage"):
                    reply.tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    if text := choice["delta"].get("content"):
                        now = time.perf_counter()
                        if last_text is None:
                            reply.ttft = now - started
                        else:
                            reply.longest_gap = max(reply.longest_gap, now - last_text)
                        last_text = now
                        reply.text += text
                    reply.finish_reason = choice["finish_reason"] or reply.finish_reason
    except (httpx.HTTPError, ValueError, KeyError) as err:
        reply.problem = f"{type(err).__name__}: {err}"
    return reply


async def open_stream(host: str, port: int, body: dict, receive_buffer: int | None = None):
    """A chat request on a socket of its own: (reader, writer, status, headers) once the headers are in."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # set before connecting, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer or 2**16)
    payload = json.dumps(body).encode()
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return reader, writer, status, headers


async def read_events(reader: asyncio.StreamReader, count: int) -> int:
    """Read up to ``count`` server-sent events of a chunked stream; how many arrived before it ended."""
    seen = 0
    while seen < count and (line := await reader.readline()):
        seen += line.startswith(b"data: ")
    return seen


async def reference_replies(url: str, requests: list[tuple[str, int]]) -> list[str]:
    """Each request alone, one at a time: the text every greedy reply to it must have."""
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, trust_env=False) as http:
        texts = []
        for index, (prompt, max_tokens) in enumerate(requests):
            reply = await stream_chat(http, index, chat_body(prompt, max_tokens), "reference")
            if not reply.completed:
                raise RuntimeError(f"the reference request {index} did not complete: {reply}")
            texts.append(reply.text)
        return texts


class LoadRun:
    """The warm-up, the load phase (the clients, the bursts and the misbehaving clients, for
    ``plan.seconds``) and the server's state after it."""

    def __init__(self, url: str, plan: Plan, requests: list[tuple[str, int]], pid: int):
        from doge_cli.inference.sampling import SEED_RANGE
        from doge_cli.serve.app import MAX_BODY

        self.plan, self.requests, self.pid = plan, requests, pid
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_S)
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(TIMEOUT_S, connect=30), limits=limits,
                                      trust_env=False)
        self.bad_seeds = itertools.cycle((SEED_RANGE[1] + 1, SEED_RANGE[0] - 1))
        self.over_limit = b"x" * (MAX_BODY + 1)
        # Valid JSON just under the limit: a prompt of ~1 MiB, hundreds of thousands of tokens.
        head = json.dumps(chat_body("", plan.max_tokens[0])).encode()
        filler = (CONTEXT_TEXT * (MAX_BODY // len(CONTEXT_TEXT) + 1))[:MAX_BODY - len(head) - 16]
        self.huge_prompt = json.dumps(chat_body(filler, plan.max_tokens[0])).encode()
        assert len(self.huge_prompt) <= MAX_BODY
        # What the run finds:
        self.replies: list[Reply] = []
        self.attacks: list[tuple[str, str]] = []  # (kind, answer label)
        self.start = self.deadline = self.wall = 0.0
        self.server_cpu = self.client_cpu = 0.0  # cores busy over the load phase
        self.threads_before = self.threads_after = 0
        self.rss_early = self.rss_end = 0.0
        self.health: dict = {}

    async def run(self) -> None:
        await self.warm_up()
        self.threads_before = thread_count(self.pid)
        loop = asyncio.get_running_loop()
        server_cpu, client_cpu = serve_bench._cpu_seconds(self.pid), time.process_time()
        self.start = loop.time()
        self.deadline = self.start + self.plan.seconds
        s, hold = self.plan.seconds, self.plan.hold
        await asyncio.gather(*(self.client(c) for c in range(self.plan.clients)),
                             self.repeat(self.burst, s / 4, s / 8),
                             self.repeat(self.bad_seed, 2, 0.5),
                             self.repeat(self.invalid_json, 2, 1.5),
                             self.repeat(self.too_large, s / 6, 0.25),
                             self.repeat(self.prompt_too_long, s / 6, s / 12),
                             self.repeat(self.hang_up, 2, 1),
                             self.repeat(self.stop_reading, hold, 0, hold),
                             self.repeat(self.stop_reading, hold, hold / 2, hold),
                             self.read_early_rss())
        self.wall = max((r.end for r in self.replies), default=loop.time()) - self.start
        busy = loop.time() - self.start
        self.server_cpu = (serve_bench._cpu_seconds(self.pid) - server_cpu) / busy
        self.client_cpu = (time.process_time() - client_cpu) / busy
        await asyncio.sleep(1)  # for the server to notice the last connections closed
        self.health = await self.settled_health()
        self.threads_after, self.rss_end = thread_count(self.pid), rss_mib(self.pid)
        await self.http.aclose()

    async def warm_up(self) -> None:
        """1 MiB prompts, as many at once as asyncio's default thread pool has threads (the server tokenizes
        there): the pool grows on demand and keeps its threads, so it is at full size before threads are
        counted, and the server's memory has met the largest prompts before its RSS is read."""
        count = min(32, (os.cpu_count() or 1) + 4)
        labels = await asyncio.gather(*(self.post(self.huge_prompt) for _ in range(count)))
        self.attacks += [("1 MiB prompt", label) for label in labels]

    async def repeat(self, action, period: float, offset: float, duration: float = 0.0) -> None:
        """``action()`` every ``period`` s from ``offset`` on, the last one starting while it can end (it
        takes about ``duration``) by the deadline."""
        loop = asyncio.get_running_loop()
        at = self.start + offset
        while at + duration <= self.deadline:
            await asyncio.sleep(at - loop.time())
            await action()
            at = max(at + period, loop.time())

    async def read_early_rss(self) -> None:
        await asyncio.sleep(self.plan.rss_at)
        self.rss_early = rss_mib(self.pid)

    async def settled_health(self, timeout: float = 10) -> dict:
        """``GET /health`` until it reports no request generating, queued or admitted (or ``timeout`` s, or
        it lacks those figures); its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            health = (await self.http.get("/health")).json()
            loads = [health.get(key) for key in LOADS]
            if None in loads or not any(loads) or time.monotonic() > deadline:
                return health
            await asyncio.sleep(0.2)

    async def send(self, request: int, source: str) -> Reply:
        prompt, max_tokens = self.requests[request]
        reply = await stream_chat(self.http, request, chat_body(prompt, max_tokens), source)
        reply.end = asyncio.get_running_loop().time()
        self.replies.append(reply)
        return reply

    async def client(self, c: int) -> None:
        """Requests one after another until the deadline; a client that gets a wrong answer stops there."""
        loop = asyncio.get_running_loop()
        for k in itertools.count():
            if loop.time() >= self.deadline:
                return
            reply = await self.send((c + k) % len(self.requests), "client")
            if not reply.acceptable:
                return
            if not reply.completed:  # a 429
                await asyncio.sleep(min(float(reply.retry_after), self.deadline - loop.time()))

    async def burst(self) -> None:
        """max_batch + max_queue requests at once, on top of the clients: some must be refused."""
        size = self.plan.max_batch + self.plan.max_queue
        await asyncio.gather(*(self.send(i % len(self.requests), "burst") for i in range(size)))

    async def insist(self, kind: str, attempt, duration: float = 0.0) -> None:
        """Record the answer ``attempt()`` got; after a 429, attempt again 0.25 s later while the load lasts
        (ignoring Retry-After), so that a misbehaving request gets past a full queue now and then. ``duration``:
        how long an attempt that gets in takes."""
        loop = asyncio.get_running_loop()
        while True:
            label = await attempt()
            self.attacks.append((kind, label))
            if label != "429 server_busy" or loop.time() + 0.25 + duration > self.deadline:
                return
            await asyncio.sleep(0.25)

    async def post(self, content: bytes) -> str:
        """``content`` as the body of a chat request; the answer's label."""
        try:
            response = await self.http.post("/v1/chat/completions", content=content,
                                             headers={"Content-Type": "application/json"})
        except httpx.HTTPError as err:
            return f"no answer ({type(err).__name__})"
        return answer_label(response.status_code, response.headers.get("retry-after"), response.content)

    async def bad_seed(self) -> None:
        body = chat_body(*self.requests[0], seed=next(self.bad_seeds))
        self.attacks.append(("seed out of range", await self.post(json.dumps(body).encode())))

    async def invalid_json(self) -> None:
        truncated = json.dumps(chat_body(*self.requests[0])).encode()[:-5]
        self.attacks.append(("invalid JSON", await self.post(truncated)))

    async def too_large(self) -> None:
        self.attacks.append(("body 1 byte over 1 MiB", await self.post(self.over_limit)))

    async def prompt_too_long(self) -> None:
        await self.insist("1 MiB prompt", lambda: self.post(self.huge_prompt))

    async def hang_up(self) -> None:
        await self.insist("hang up mid-stream", lambda: self.raw_stream(2, 0))

    async def stop_reading(self) -> None:
        hold = self.plan.hold
        await self.insist("stop reading", lambda: self.raw_stream(1, hold, receive_buffer=4096), hold)

    async def raw_stream(self, events: int, hold: float, receive_buffer: int | None = None) -> str:
        """A long stream on a socket of its own: read ``events`` events, wait ``hold`` s without reading, close;
        the answer's label."""
        body = chat_body(self.requests[0][0], self.plan.long_tokens)
        try:
            reader, writer, status, headers = await asyncio.wait_for(
                open_stream(self.host, self.port, body, receive_buffer), TIMEOUT_S)
        except (OSError, ValueError, IndexError, asyncio.TimeoutError) as err:
            return f"no answer ({type(err).__name__})"
        try:
            if status != 200:
                answer = await asyncio.wait_for(reader.read(), TIMEOUT_S)
                error = answer[answer.find(b"{"):answer.rfind(b"}") + 1]  # the JSON, whole or chunked
                return answer_label(status, headers.get("retry-after"), error)
            seen = await asyncio.wait_for(read_events(reader, events), TIMEOUT_S)
            if seen < events:
                return f"200, stream ended after {seen} events"
            await asyncio.sleep(hold)
            return "200"
        except (OSError, ValueError, asyncio.TimeoutError) as err:
            return f"200, then {type(err).__name__}"
        finally:
            writer.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def counts(labels: list[str]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in Counter(labels).most_common())


def report(run: LoadRun, reference: list[str], log: str, exit_status: int | None) -> bool:
    """Print the results table and the checks; whether every check passed."""
    replies, plan = run.replies, run.plan
    completed = [r for r in replies if r.completed]
    ttft = [r.ttft for r in completed if r.ttft is not None]
    wrong = [r for r in replies if not r.acceptable]
    differ = [r for r in completed if r.text != reference[r.request]]
    unexpected = [(kind, label) for kind, label in run.attacks if label not in EXPECTED[kind]]
    missing = sorted(set(EXPECTED) - {kind for kind, _ in run.attacks})
    refused = sum(r.label == "429 server_busy" for r in replies if r.source == "burst")
    growth = run.rss_end / run.rss_early - 1
    loads = {key: run.health.get(key) for key in LOADS}
    tracebacks = log.count("Traceback")

    print("| measure | result |")
    print("|---|---|")
    print(f"| well-formed requests | {len(replies):,}: {counts([r.label for r in replies])} |")
    print(f"| completed replies | {len(completed):,} ({len(differ)} differ from the reply alone) |")
    print(f"| generated tokens/s (completed replies, {run.wall:.1f} s) | "
          f"{sum(r.tokens for r in completed) / run.wall:,.0f} |")
    if ttft:
        print(f"| time to first token p50 / p99 | {percentile(ttft, 0.5) * 1000:,.0f} / "
              f"{percentile(ttft, 0.99) * 1000:,.0f} ms |")
    longest_gap = max((r.longest_gap for r in completed), default=0)
    print(f"| longest pause inside a stream | {longest_gap * 1000:,.0f} ms |")
    for kind in EXPECTED:
        print(f"| {kind} | {counts([label for k, label in run.attacks if k == kind]) or 'not sent'} |")
    print(f"| CPU busy (load phase) | server {run.server_cpu:.2f} cores, clients {run.client_cpu:.2f} cores |")
    print(f"| server RSS {plan.rss_at:g} s in / at the end | {run.rss_early:,.0f} / {run.rss_end:,.0f} MiB "
          f"({growth:+.1%}) |")
    print(f"| server threads before / after | {run.threads_before} / {run.threads_after} |")
    print(f"| /health after the run | {', '.join(f'{k} {v}' for k, v in loads.items())} |")

    checks = [
        ("well-formed requests completed or got 429", not wrong,
         f"{len(wrong)} did not" + "".join(f"; {r.label} {r.problem or ''} finish={r.finish_reason} done={r.done}"
                                           for r in wrong[:5])),
        ("greedy replies equal the reply alone", not differ,
         f"{len(differ)} of {len(completed)} differ" + "".join(
             f"; request {r.request}: {r.text[:60]!r} vs {reference[r.request][:60]!r}" for r in differ[:3])),
        ("bursts got 429 with Retry-After", refused > 0, f"{refused} burst requests refused"),
        ("misbehaving requests got their expected status", not unexpected and not missing,
         f"{len(run.attacks)} sent, unexpected: {counts([f'{k}: {label}' for k, label in unexpected]) or 'none'}, "
         f"never sent: {', '.join(missing) or 'none'}"),
        ("server RSS flat", growth <= plan.rss_bound, f"{growth:+.1%}, bound {plan.rss_bound:+.0%}"),
        ("server threads no more than before", run.threads_after <= run.threads_before,
         f"{run.threads_before} -> {run.threads_after}"),
        ("engine rows and places free", all(v == 0 for v in loads.values()), json.dumps(run.health)),
        ("no traceback in the server's log", tracebacks == 0, f"{tracebacks} tracebacks"),
        ("the server exited 0 on SIGTERM", exit_status == 0,
         "still running 30 s later" if exit_status is None else f"exit status {exit_status}"),
    ]
    for name, ok, detail in checks:
        print(f"{'ok' if ok else 'FAILED'}: {name} ({detail})")
    return all(ok for _, ok, _ in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M")
    parser.add_argument("--clients", type=int, help="well-formed streaming clients (default 64; --quick 8)")
    parser.add_argument("--seconds", type=float, help="length of the load phase (default 60; --quick 10)")
    parser.add_argument("--max-batch", type=int, help="doge serve --max-batch (default 8; --quick 4)")
    parser.add_argument("--max-queue", type=int, help="doge serve --max-queue (default 24; --quick 4)")
    parser.add_argument("--quick", action="store_true", help="tiny run (1M size, small tokenizer) for tests")
    args = parser.parse_args(argv)
    if args.quick:  # the 1M size has a 256-token context
        size, vocab = "1M", 1024
        plan = Plan(args.clients or 8, args.seconds or 10, args.max_batch or 4, args.max_queue or 4,
                    prompt_words=(0, 20, 60), max_tokens=(8, 16, 32), long_tokens=200, rss_bound=0.25)
    else:
        size, vocab = args.size, 32768
        plan = Plan(args.clients or 64, args.seconds or 60, args.max_batch or 8, args.max_queue or 24,
                    prompt_words=(0, 40, 160, 480), max_tokens=(8, 32, 64, 128), long_tokens=1024, rss_bound=0.1)
    requests = [(prompt, n) for prompt in make_prompts(plan.prompt_words) for n in plan.max_tokens]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="doge-serve-load-") as tmp:
        root = Path(tmp)
        model_dir = serve_bench.build_model(root, size, vocab)
        proc, url = start_server(model_dir, root / "server.log", plan.max_batch, plan.max_queue)
        try:
            reference = asyncio.run(reference_replies(url, requests))
            run = LoadRun(url, plan, requests, proc.pid)
            asyncio.run(run.run())
        finally:
            exit_status = stop_server(proc)
        log = (root / "server.log").read_text()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
          f"{platform.python_version()}; server and clients share it")
    print(f"random-weight Doge-{size}, {vocab}-token BPE; doge serve --max-batch {plan.max_batch} --max-queue "
          f"{plan.max_queue}; {plan.clients} greedy streaming clients for {plan.seconds:g} s over {len(requests)} "
          f"requests (prompts of {'/'.join(map(str, plan.prompt_words))} words of context + a question, max_tokens "
          f"{'/'.join(map(str, plan.max_tokens))}), bursts of {plan.max_batch + plan.max_queue}, misbehaving "
          f"clients alongside; whole run {time.perf_counter() - began:.0f} s")
    return 0 if report(run, reference, log, exit_status) else 1


if __name__ == "__main__":
    sys.exit(main())
