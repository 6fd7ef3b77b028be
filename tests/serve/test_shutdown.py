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
