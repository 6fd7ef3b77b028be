"""benchmarks/time_to_loss.py's Muon-rate sweep over several draws: the mean decides, errors are reported,
--sweep-only stops before the comparison (the training runs themselves are stubbed: they take minutes)."""

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_loss.py"


@pytest.fixture
def ttl(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_time_to_loss", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    draws = []
    monkeypatch.setattr(module, "make_data", lambda root, size, seq_len, rows, seed: draws.append((seed, rows)))
    # Loss by (draw, rate): 0.02 is best on draw 1 alone, 0.01 on the mean of three draws.
    table = {1: {0.01: 5.0, 0.02: 4.9}, 2: {0.01: 5.0, 0.02: 5.3}, 3: {0.01: 5.2, 0.02: 5.2}}

    def run_child(args, root, side, steps):
        assert side == "muon" and steps == args.sweep_steps
        return {"held_out_loss": table[draws[-1][0]][args.muon_lr], "wall_s": 1.0, "tokens_per_s": 1.0}

    monkeypatch.setattr(module, "run_child", run_child)
    module.draws = draws
    return module


def test_the_lowest_mean_over_draws_wins_and_sweep_only_stops_there(ttl, capsys):
    ttl.main(["--sweep-muon-lrs", "0.01,0.02", "--sweep-steps", "7", "--sweep-seeds", "3", "--sweep-only"])
    out = capsys.readouterr().out
    assert ttl.draws == [(1, 7), (2, 7), (3, 7)]  # one draw per seed, never seed 0 (the comparison's)
    sweep = json.loads(next(line for line in out.splitlines() if line.startswith("SWEEP "))[6:])
    assert sweep["best"] == 0.01 and sweep["seeds"] == 3
    assert sweep["losses"] == {"0.01": [5.0, 5.0, 5.2], "0.02": [4.9, 5.3, 5.2]}
    assert "muon_lr 0.01: 5.0667 (0.0667)  <- best" in out
    assert "muon_lr 0.02: 5.1333 (0.1202)  +0.0667 (0.1202)" in out  # differences -0.1, 0.3, 0 by draw
    assert "reference" not in out  # no comparison ran


def test_one_draw_picks_its_own_best(ttl, capsys):
    ttl.main(["--sweep-muon-lrs", "0.01,0.02", "--sweep-steps", "7", "--sweep-only"])
    out = capsys.readouterr().out
    assert ttl.draws == [(1, 7)]
    assert json.loads(next(line for line in out.splitlines() if line.startswith("SWEEP "))[6:])["best"] == 0.02


@pytest.mark.parametrize("argv", [["--sweep-only"], ["--sweep-muon-lrs", "0.01", "--sweep-seeds", "0"],
                                  ["--sweep-muon-lrs", "0.01,x"], ["--size", "7B", "--sweep-muon-lrs", "0.01"]])
def test_bad_sweep_flags_exit_2(ttl, argv):
    with pytest.raises(SystemExit) as bad:
        ttl.main(argv)
    assert bad.value.code == 2 and ttl.draws == []
