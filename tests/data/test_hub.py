"""The hub path, exercised offline through a local folder laid out like the hub repos."""

import datasets
import pytest

from doge_cli.data import hub
from doge_cli.data.download import download_recipe
from doge_cli.errors import DogeError


def _repo(root, repo, configs):
    """Write parquet files and a dataset card declaring configs/splits, as hub repos do."""
    folder = root / repo
    lines = ["---", "configs:"]
    for config, (split, rows) in configs.items():
        rel = f"{config or 'data'}/{split}-00000-of-00001.parquet"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(folder / rel))
        lines += [f"- config_name: {config or 'default'}", "  data_files:", f"  - split: {split}", f"    path: {rel}"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))


@pytest.fixture()
def mirror(tmp_path):
    root = tmp_path / "mirror"
    _repo(root, "HuggingFaceTB/smollm-corpus", {
        "fineweb-edu-dedup": ("train", [{"text": f"web page {i}", "id": str(i)} for i in range(25)]),
        "cosmopedia-v2": ("train", [{"prompt": f"Write {i}", "text": f"Essay {i}"} for i in range(10)]),
    })
    chosen = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}]
    rejected = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]
    _repo(root, "HuggingFaceH4/ultrafeedback_binarized", {
        None: ("train_prefs", [{"prompt": "Q?", "chosen": chosen, "rejected": rejected}] * 4),
    })
    _repo(root, "AI-MO/NuminaMath-TIR", {
        None: ("train", [{"problem": "2+3?", "solution": "We add: \\boxed{5}."}] * 3),
    })
    return root


def test_hub_sources_through_a_mirror(mirror, tmp_path):
    out = tmp_path / "ds"
    download_recipe("pretrain", out, sources=["fineweb-edu-dedup", "cosmopedia-v2"], hub_mirror=mirror)
    web = datasets.load_from_disk(str(out / "pt/fineweb-edu-dedup"))
    assert len(web) == 25 and web.column_names == ["text"]
    assert datasets.load_from_disk(str(out / "pt/cosmopedia-v2"))[0] == {"text": "Essay 0", "prompt": "Write 0"}
    download_recipe("dpo", out, hub_mirror=mirror)
    assert datasets.load_from_disk(str(out / "dpo/ultrafeedback_binarized"))[0] == {
        "prompt": [{"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad"}
    m = download_recipe("grpo", out, hub_mirror=mirror, max_examples=2)[0]
    assert m["rows"] == 2 and datasets.load_from_disk(str(out / "grpo/numinamath-tir"))[0]["answer"] == "5"
    assert {"source", "revision", "rows", "bytes"} <= set(m)


def test_interrupted_stream_resumes(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "SHARD_ROWS", 4)
    real = datasets.load_dataset
    state = {"fail": True}

    def flaky(*args, **kwargs):
        ds = real(*args, **kwargs)
        if not (kwargs.get("streaming") and state["fail"]):
            return ds

        def rows():
            for i, row in enumerate(ds):
                if i == 10:
                    raise ConnectionError("connection reset")
                yield row

        return _Stream(rows, ds)

    monkeypatch.setattr(datasets, "load_dataset", flaky)
    out = tmp_path / "ds"
    with pytest.raises(DogeError):
        download_recipe("pretrain", out, sources=["fineweb-edu-dedup"], hub_mirror=mirror, streaming=True)
    partial = out / "pt/.fineweb-edu-dedup.partial"
    assert len(list(partial.glob("shard-*.parquet"))) == 3  # rows 0-9 kept, in shards of 4, 4, 2
    assert not (out / "pt/fineweb-edu-dedup").exists()
    state["fail"] = False
    download_recipe("pretrain", out, sources=["fineweb-edu-dedup"], hub_mirror=mirror, streaming=True)
    texts = datasets.load_from_disk(str(out / "pt/fineweb-edu-dedup"))["text"]
    assert list(texts) == [f"web page {i}" for i in range(25)]
    assert not partial.exists()


class _Stream:
    def __init__(self, rows, ds):
        self._rows, self._ds = rows, ds

    def __iter__(self):
        return self._rows()

    def skip(self, n):
        return self._ds.skip(n)


def test_hub_id_while_offline_names_quickstart(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DogeError, match="--recipe quickstart"):
        download_recipe("sft", tmp_path / "ds")
    with pytest.raises(DogeError, match="has no source"):
        download_recipe("sft", tmp_path / "ds", sources=["nope"])
    assert not (tmp_path / "ds" / "sft").exists()


def test_python_edu_is_left_out_of_the_pretrain_recipe_and_says_why(tmp_path):
    """smollm-corpus python-edu has no text column (only Software Heritage blob ids): the recipe skips it
    instead of failing after the first sources, and asking for it explains where its code lives."""
    from doge_cli.data.download import RECIPES

    assert "python-edu" not in RECIPES["pretrain"]
    with pytest.raises(DogeError, match="blob ids.*--local"):
        download_recipe("pretrain", tmp_path / "ds", sources=["python-edu"])
    assert not (tmp_path / "ds").exists()


class _FlakyServer:
    """A local stand-in for a file server that rate-limits: plain HTTP over 127.0.0.1, three jsonl files of
    rows, and a list of (file, status) answers given before a file is served."""

    def __init__(self, failures):
        import http.server
        import json
        import threading

        self.files = {f"part-{i}.jsonl": "".join(json.dumps({"text": f"file {i} row {j}"}) + "\n" for j in range(40))
                      .encode() for i in range(3)}
        self.failures, self.answered = list(failures), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, with_body):
                name = self.path.lstrip("/")
                for i, (file, status) in enumerate(server.failures):
                    # A failing download: the reads of the data (range requests), not datasets' probes that find
                    # the files (a failed probe is "file not found" to datasets, whatever the status).
                    if file == name and with_body and self.headers.get("Range"):
                        del server.failures[i]
                        server.answered.append((name, status))
                        self.send_response(status)
                        self.send_header("Retry-After", "0") if status == 429 else None
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = server.files.get(name)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                ranged = self.headers.get("Range")
                if ranged and with_body:
                    lo, hi = ranged.split("=")[1].split("-")
                    lo, hi = int(lo), min(int(hi) if hi else len(body) - 1, len(body) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(body)}")
                    body = body[lo:hi + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def open(self, names=("part-0.jsonl", "part-1.jsonl", "part-2.jsonl")):
        return lambda: datasets.load_dataset("json", data_files=[f"{self.url}/{n}" for n in names], split="train",
                                             streaming=True)

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def datasets_gives_up_at_once(monkeypatch):
    """datasets retries a failed read itself (every 5-60 s, 20 times); with one try and no wait, each failure
    reaches doge's own backoff, which takes over once datasets gives up."""
    monkeypatch.setattr(datasets.config, "STREAMING_READ_MAX_RETRIES", 1)
    monkeypatch.setattr(datasets.config, "STREAMING_READ_RETRY_INTERVAL", 0)


def _stream(server, tmp_path, logs, sleeps, **kwargs):
    return hub.stream_to_shards(server.open(**kwargs), {"repo": "flaky"}, None, tmp_path / "partial", name="flaky",
                                log=logs.append, error=lambda err: DogeError(f"gave up: {err}"), sleep=sleeps.append)


def test_a_rate_limited_stream_waits_and_continues_past_the_rows_it_has(tmp_path, datasets_gives_up_at_once):
    server = _FlakyServer([("part-0.jsonl", 429), ("part-1.jsonl", 503), ("part-1.jsonl", 503)])
    logs, sleeps = [], []
    try:
        ds = _stream(server, tmp_path, logs, sleeps)
    finally:
        server.close()
    assert ds["text"] == [f"file {i} row {j}" for i in range(3) for j in range(40)]  # every row once, in order
    assert [s for _, s in server.answered] == [429, 503, 503]
    assert any("HTTP 429 (too many requests) after 0 rows; waiting 0 s" in line for line in logs)
    assert any("HTTP 503 (service unavailable) after 40 rows; waiting 1 s" in line for line in logs)
    assert any("HTTP 503 (service unavailable) after 40 rows; waiting 2 s" in line for line in logs)
    assert sleeps == [0.0, 1.0, 2.0]


def test_a_server_that_keeps_failing_is_given_up_and_other_errors_are_not_retried(tmp_path, datasets_gives_up_at_once):
    server = _FlakyServer([("part-0.jsonl", 502)] * 20)
    logs, sleeps = [], []
    try:
        with pytest.raises(DogeError, match="gave up"):
            _stream(server, tmp_path, logs, sleeps)
        assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0] and len(logs) == hub.RETRIES - 1
        logs.clear()
        sleeps.clear()
        with pytest.raises(DogeError, match="gave up"):
            _stream(server, tmp_path, logs, sleeps, names=("missing.jsonl",))
        assert sleeps == [] and logs == []
    finally:
        server.close()
