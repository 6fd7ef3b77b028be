"""Stopping ``doge serve``: SIGTERM ends requests in flight with an error and the process exits cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request

from tests.serve.conftest import save_random_model, start_server, stop_server


def test_sigterm_ends_a_stream_in_flight_and_exits_zero(tmp_path):
    server = start_server(save_random_model(tmp_path), tmp_path / "server.log", "--served-name", "tiny",
                          "--max-new-tokens", "4000")
    try:
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 4000, "temperature": 0,
                           "stream": True}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            first = response.readline()
            assert first.startswith(b"data: {")  # generation is under way
            server.process.send_signal(signal.SIGTERM)
            rest = response.read().decode()
        assert '"the server is shutting down"' in rest and rest.rstrip().endswith("data: [DONE]")
        assert server.process.wait(timeout=30) == 0
    finally:
        if server.process.poll() is None:
            stop_server(server)
    assert "Traceback" not in server.log.read_text()


def test_the_process_exits_zero_on_sigterm_when_idle(tmp_path):
    server = start_server(save_random_model(tmp_path), tmp_path / "server.log", "--served-name", "tiny")
    server.process.send_signal(signal.SIGTERM)
    try:
        assert server.process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        stop_server(server)
        raise
    assert "Traceback" not in server.log.read_text()


def test_a_signal_before_the_http_thread_starts_still_exits_cleanly():
    """SIGTERM right after the URL is printed, before the HTTP thread exists (found by CI: the shutdown
    joined a thread that was never started)."""
    import socket

    from doge_cli.cli.serve import _run

    class Server:
        started = False
        should_exit = False

        def run(self, sockets):
            raise AssertionError("the HTTP server must not start")

    class Worker:
        closed = None

        def run(self):
            raise AssertionError("the engine loop must not start")

        def close(self, message):
            self.closed = message

        def stop(self):
            pass

    def announce():
        raise KeyboardInterrupt  # what the SIGTERM handler raises

    worker, server = Worker(), Server()
    with socket.socket() as sock:
        _run(server, sock, worker, announce)
    assert worker.closed == "the server is shutting down" and server.should_exit


def test_the_default_served_name_is_the_folders_not_its_path(tmp_path):
    """The name is public (/v1/models, the page): it was the path as typed, e.g. a home folder."""
    import httpx

    model = save_random_model(tmp_path / "home" / "ann" / "secret-project")
    server = start_server(model, tmp_path / "server.log")
    try:
        ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
        page = httpx.get(server.url + "/", timeout=30).text
    finally:
        stop_server(server)
    assert ids == [model.resolve().name] and "ann" not in ids[0]
    assert str(tmp_path) not in page
