"""``doge serve`` under load: total generated tokens/s for 1, 4 and 8 concurrent streaming clients.

One server (``doge serve`` in a subprocess, ``--max-batch 8``) over a random-weight Doge of the given size
with a real 32k byte-level BPE tokenizer (trained here on the builtin quickstart data, offline). Each
client sends ``--requests`` chat requests one after another (streaming, temperature 0.8, top-p 0.9,
``max_tokens`` new tokens, a different prompt and seed each); the figure is all clients' generated
tokens (``usage``) over the wall time from the first request to the last reply. Time to first token is
measured per request, to the first chunk that carries text. The same requests as the 8-client run are
then generated in this process without HTTP: one at a time the way ``doge chat`` does (an engine with
one row), and 8 at a time through one engine (what batching alone gives on this machine). Server and
client CPU use (cores busy over the run) are reported, since the clients share the machine. Rounds alternate the client counts; figures are medians.

    .venv/bin/python benchmarks/serve.py [--size 20M] [--requests 3] [--max-tokens 128] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["Tell me a story about a dog who learns to swim.", "What is the capital of France?",
           "Explain why the sky is blue.", "Write a short poem about autumn leaves.",
           "How do I sort a list in Python?", "Give me three tips for sleeping better.",
           "What is 17 times 23?", "Describe the water cycle in simple words."]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _doge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "doge_cli", *args], check=True, env=ENV, capture_output=True, text=True)


def build_model(root: Path, size: str, vocab: int) -> Path:
    """A random-weight Doge of ``size`` with a tokenizer trained on the builtin quickstart data."""
    import torch

    from doge_cli.data.tokenizer import load_tokenizer
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.model.sizes import size_config

    _doge("data", "download", "--recipe", "quickstart", "--save-dir", str(root / "datasets"))
    _doge("data", "train-tokenizer", "--out", str(root / "tokenizer"), "--vocab-size", str(vocab),
          "--datasets-dir", str(root / "datasets"))
    tok = load_tokenizer(str(root / "tokenizer"))
    config = size_config(size)
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    return save_pretrained(DogeForCausalLM(config).eval(), root / "model", tokenizer=tok)


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "doge_cli", "serve", str(model), "--port", "0",
                                 "--served-name", "bench", "--max-batch", "8", "--no-ui"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"doge serve did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, "http://" + line.split("http://", 1)[1].split()[0].rsplit("/v1", 1)[0].rstrip("/")


def one_request(http, url: str, index: int, max_tokens: int) -> tuple[int, float]:
    """Stream one chat reply; (generated tokens, seconds to the first text)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = None
    with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
            if '"usage":{' in line:
                tokens = json.loads(line[len("data: "):])["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return tokens, first if first is not None else time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, clients: int, requests: int, max_tokens: int, server_pid: int) -> dict:
    import httpx

    start = threading.Barrier(clients)

    def client(c: int) -> list[tuple[int, float]]:
        with httpx.Client(timeout=600) as http:
            start.wait()
            return [one_request(http, url, c * requests + r, max_tokens) for r in range(requests)]

    server_cpu, client_cpu, t0 = _cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per in pool.map(client, range(clients)) for x in per]
    wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall, "ttft": [f for _, f in results],
            "server_cpu": _cpu_seconds(server_pid) - server_cpu, "client_cpu": time.process_time() - client_cpu}


def in_process(model_dir: Path, n: int, max_tokens: int, batch: int) -> dict:
    """The same requests generated in this process without HTTP: ``batch`` 1 is one at a time, as ``doge
    chat`` generates; a larger batch runs them that many at once through one engine (the server's
    ceiling on this machine)."""
    import torch

    from doge_cli.chat.loading import load_model_and_tokenizer
    from doge_cli.chat_format import prompt_ids, stop_ids
    from doge_cli.inference import Engine, Request, SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = load_model_and_tokenizer(str(model_dir), device="cpu")
    stops = stop_ids(model.config, tok)
    tokens, ttft, t0 = 0, [], time.perf_counter()
    for wave in range(0, n, batch):
        began = time.perf_counter()
        requests, firsts = [], []
        for index in range(wave, min(n, wave + batch)):
            ids = prompt_ids(tok, [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}])
            first: list[float] = []

            def on_text(_delta: str, first=first, began=began) -> None:
                if not first:
                    first.append(time.perf_counter() - began)

            firsts.append(first)
            requests.append(Request(ids, SamplingParams(max_new_tokens=max_tokens, temperature=0.8, top_p=0.9,
                                                        seed=index), stop_token_ids=stops, on_text=on_text))
        Engine(model, tok, max_batch=batch).generate(requests)
        tokens += sum(len(r.token_ids) for r in requests)
        ttft += [first[0] if first else time.perf_counter() - began for first in firsts]
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall, "ttft": ttft}


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny run (1M size, small tokenizer) for tests")
    args = parser.parse_args(argv)
    size, vocab = ("1M", 1024) if args.quick else (args.size, 32768)
    counts = (1, 2) if args.quick else (1, 4, 8)
    with tempfile.TemporaryDirectory(prefix="doge-serve-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root, size, vocab)
        proc, url = start_server(model_dir, root / "server.log")
        try:
            run_clients(url, 1, 1, 8, proc.pid)  # warm-up
            runs: dict[int, list[dict]] = {n: [] for n in counts}
            for _ in range(args.rounds):
                for n in counts:
                    runs[n].append(run_clients(url, n, args.requests, args.max_tokens, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        solo = in_process(model_dir, counts[-1] * args.requests, args.max_tokens, 1)
        batched = in_process(model_dir, counts[-1] * args.requests, args.max_tokens, counts[-1])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"random-weight Doge-{size}, {vocab}-token BPE, {args.requests} streaming chat requests per client of "
          f"{args.max_tokens} new tokens (T=0.8, top-p 0.9), --max-batch 8, medians of {args.rounds} rounds")
    print("| clients | requests | total tok/s | vs 1 client | TTFT p50 ms | TTFT p95 ms | server CPU | clients' CPU |")
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.median(r["tok_s"] for r in runs[1])
    speed = {}
    for n in counts:
        tok_s = statistics.median(r["tok_s"] for r in runs[n])
        ttft = [f for r in runs[n] for f in r["ttft"]]
        speed[n] = tok_s / base
        server = statistics.median(r["server_cpu"] / r["wall"] for r in runs[n])
        client = statistics.median(r["client_cpu"] / r["wall"] for r in runs[n])
        print(f"| {n} | {n * args.requests} x {args.rounds} | {tok_s:,.0f} | {tok_s / base:.2f}x | "
              f"{_p(ttft, 0.5) * 1000:,.0f} | {_p(ttft, 0.95) * 1000:,.0f} | {server:.2f} cores | {client:.2f} cores |")
    print(f"| one at a time, in process (doge chat) | {len(solo['ttft'])} | {solo['tok_s']:,.0f} | "
          f"{solo['tok_s'] / base:.2f}x | {_p(solo['ttft'], 0.5) * 1000:,.0f} | {_p(solo['ttft'], 0.95) * 1000:,.0f} "
          "| | |")
    print(f"| {counts[-1]} at once, in process (one engine, no HTTP) | {len(batched['ttft'])} | "
          f"{batched['tok_s']:,.0f} | {batched['tok_s'] / base:.2f}x | {_p(batched['ttft'], 0.5) * 1000:,.0f} | "
          f"{_p(batched['ttft'], 0.95) * 1000:,.0f} | | |")
    top = counts[-1]
    print(f"{top} clients: {speed[top]:.2f}x the total tokens/s of 1 client"
          + (f" (target >= 4x: {'met' if speed[top] >= 4 else 'NOT met'})" if top == 8 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
