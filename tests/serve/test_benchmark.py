"""benchmarks/serve.py end to end at the 1M size (its own server, real streaming clients)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def test_serve_benchmark_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--rounds", "1", "--requests", "1", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"1", "2", "one at a time, in process (doge chat)", "2 at once, in process (one engine, no HTTP)"} <= set(rows)
    for cells in rows.values():
        if cells[3].strip().replace(",", "").isdigit():
            assert int(cells[3].strip().replace(",", "")) > 0  # tokens/s measured, not blank
    assert rows["1"][4].strip() == "1.00x"
    assert "2 clients:" in out
