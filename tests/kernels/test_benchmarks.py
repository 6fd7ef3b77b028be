"""The kernel benchmark scripts run end to end at tiny sizes (the GPU one on the interpreter)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_gpu_smoke(capsys):
    assert _load("kernels_gpu").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "correctness: all passed" in out
    assert "FAIL" not in out
    triton_rows = [line for line in out.splitlines() if "| triton dma (ours) |" in line]
    assert triton_rows and all("n/a" not in line for line in triton_rows)
    assert any("| sdpa flash, no bias |" in line for line in out.splitlines())


def test_fused_ce_benchmark_tiny(capsys):
    _load("fused_ce").main(["--tokens", "256", "--vocab", "512", "--hidden", "32", "--chunk", "64",
                            "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| unfused") or line.startswith("| fused")]
    assert len(rows) == 2
    # Same loss from both paths.
    assert rows[0].split("|")[2] == rows[1].split("|")[2]


def test_gpu_check_smoke(capsys):
    """`make gpu-check SMOKE=1`: every part of the GPU check at tiny sizes on the CPU (a few minutes). Its
    generation part is benchmarks/generation.py end to end at the 1M size: both stacks, both precisions, the
    same greedy tokens in fp32 (checked here rather than by running the script a second time)."""
    assert _load("gpu_check").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "gpu-check: 6/6 parts passed" in out, out[-3000:]
    assert "pytest: " in out and " passed" in out.split("pytest: ")[1].splitlines()[0]  # the graphs part's tests
    trained = [line for line in out.splitlines() if line.startswith("| 1M | ")]
    assert [line.split("|")[2].strip() for line in trained] == ["triton", "sdpa", "flex"]
    assert "last losses 0.00% apart across backends" in out
    assert "launch configs:" in out  # the kernel part names the launch configuration it used
    assert "ZeRO-2) vs" in out and "median speed ratio over all rows" in out
    rows = [line for line in out.splitlines() if line.startswith("| float32 |") and "x" in line.split("|")[2]]
    assert len(rows) == 4 and all(line.rstrip().endswith("| yes |") for line in rows), out


def test_moe_step_benchmark_quick(capsys):
    """benchmarks/moe_step.py end to end at the 1M size: both stacks, the same first loss (same weights)."""
    assert _load("moe_step").main(["--quick", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| 64 (8)", "| dense"))]
    assert len(rows) == 2
    for cells in rows:
        ref, ours = cells[-2].strip().split(" / ")
        assert ref == ours  # identical first loss: same weights, same loss, router loss included
