"""benchmarks/serve_load.py end to end in quick mode: a 1M model behind ``doge serve`` under streaming load
and misbehaving clients at once; every check the script makes must hold."""

import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
CHECKS = {"well-formed requests completed or got 429", "greedy replies equal the reply alone",
          "bursts got 429 with Retry-After", "misbehaving requests got their expected status", "server RSS flat",
          "server threads no more than before", "engine rows and places free", "no traceback in the server's log",
          "the server exited 0 on SIGTERM"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def statuses(cell: str) -> dict[str, int]:
    """``"200 x12, 429 server_busy x3"`` as {"200": 12, "429 server_busy": 3}."""
    return {label.strip(): int(n) for label, n in re.findall(r"([^,]+?) x(\d+)", cell)}


def test_serve_load_quick(capsys):
    bench = load_benchmark()
    status = bench.main(["--quick"])
    out = capsys.readouterr().out
    checks = {name: result for result, name in re.findall(r"^(ok|FAILED): (.+?) \(", out, re.M)}
    assert set(checks) == CHECKS, out
    assert [name for name, result in checks.items() if result != "ok"] == [], out
    assert status == 0

    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in out.splitlines())
            if len(cells) == 4 and cells[1].strip() not in ("measure", "---")}
    requests = statuses(rows["well-formed requests"].split(": ", 1)[1])
    assert set(requests) <= {"200", "429 server_busy"} and requests["200"] > 0, rows["well-formed requests"]
    assert rows["completed replies"].endswith("(0 differ from the reply alone)")
    for kind, expected in bench.EXPECTED.items():  # every kind was sent, and answered as it should be
        assert statuses(rows[kind]) and set(statuses(rows[kind])) <= expected, (kind, rows[kind])
    # ... and the ones that may be refused for a full queue got in too: tokenized, hung up on, left unread.
    assert "400 context_length_exceeded" in statuses(rows["1 MiB prompt"])
    assert "200" in statuses(rows["hang up mid-stream"]) and "200" in statuses(rows["stop reading"])
    assert rows["/health after the run"] == "generating 0, queued 0, admitted 0"
    tokens_per_s = next(value for name, value in rows.items() if name.startswith("generated tokens/s"))
    assert int(tokens_per_s.replace(",", "")) > 0
