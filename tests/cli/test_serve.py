"""``doge serve``'s own errors (the server itself: tests/serve)."""

from __future__ import annotations

import socket
import sys

from tests.cli.helpers import run_doge


def test_without_the_extra_it_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if doge-cli[serve] were not installed
    code, out, err = run_doge(capsys, "serve", str(tmp_path))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["doge: error: doge serve needs FastAPI and uvicorn (uvicorn is missing); "
                                        "install them with: pip install 'doge-cli[serve]'"]


def test_a_taken_port_is_one_line(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_doge(capsys, "serve", str(tmp_path / "model"), "--port", str(port))
    assert code == 2
    assert err.strip().splitlines() == [f"doge: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                                        "pick another with --port (0: any free port)"]


def test_asyncios_gone_client_warning_is_dropped_and_nothing_else():
    """Writes to a client that went away make asyncio warn 'socket.send() raised exception.'; the request's
    own log line says it (cancelled: the client went away), so doge serve drops that one message only."""
    import logging

    from doge_cli.cli.serve import _GoneClientFilter

    def record(message):
        return logging.LogRecord("asyncio", logging.WARNING, __file__, 1, message, None, None)

    keep = _GoneClientFilter()
    assert not keep.filter(record("socket.send() raised exception."))
    assert keep.filter(record("Task exception was never retrieved"))
