"""logging.report_to=[trackio]: the same steps and values as metrics.jsonl reach trackio's local store (read
back with trackio's own reader), the config goes with them, a resumed run continues without sending a step
twice, and a missing package is one line before anything is written."""

from __future__ import annotations

import json
import sys

import pytest

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.train.core import train
from doge_cli.train.objectives import objective_for

from .conftest import tiny_overrides

trackio = pytest.importorskip("trackio")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """trackio's store in this test's folder (trackio reads TRACKIO_DIR when imported)."""
    from trackio import sqlite_storage, utils

    folder = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(folder))
    monkeypatch.setattr(utils, "TRACKIO_DIR", folder)
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", folder, raising=False)
    return folder


def run(pt_data, out, steps, resume=None, stop_after=None, **extra):
    cfg = resolve_config("pt", hardware="cpu", overrides=tiny_overrides(
        pt_data, out, steps=steps, **{"logging.report_to": "[trackio]", "logging.project": "doge-tests", **extra}))
    return train(cfg, objective_for(cfg), resume=resume, stop_after=stop_after)


def logged(out):
    from trackio import SQLiteStorage

    name = json.loads((out / "trackio_run.json").read_text())["name"]
    return name, SQLiteStorage.get_logs("doge-tests", name)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trackio_gets_the_steps_and_values_of_metrics_jsonl_and_the_config(pt_data, tmp_path, store):
    from trackio import SQLiteStorage

    out = tmp_path / "run"
    run(pt_data, out, steps=4)
    name, rows = logged(out)
    assert name.startswith("run-") and any(store.glob("doge-tests*.db"))  # in the store the test named
    assert [r["step"] for r in rows] == [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    for row, record in zip(rows, metrics(out)):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert row[key] == pytest.approx(record[key], rel=1e-12), key
    config = SQLiteStorage.get_run_config("doge-tests", name)
    assert config["stage"] == "pt" and config["train"]["max_steps"] == 4


def test_a_resumed_run_continues_the_same_trackio_run_without_repeating_steps(pt_data, tmp_path, store):
    out = tmp_path / "run"
    run(pt_data, out, steps=4, stop_after=3, **{"checkpoint.every": 2})  # logged 1-3, checkpoint at 2
    first, _ = logged(out)
    run(pt_data, out, steps=4, resume="auto", **{"checkpoint.every": 2})  # retrains 3 and 4
    again, rows = logged(out)
    assert again == first and json.loads((out / "trackio_run.json").read_text())["last_step"] == 4
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 retrained but not sent again
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics(out)], rel=1e-12)


def test_trackio_missing_is_refused_before_anything_is_written(pt_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(DogeError, match=r"has trackio, which is not installed; install it with: pip install "
                                        r"'doge-cli\[track\]'"):
        run(pt_data, tmp_path / "a", steps=2)
    assert not (tmp_path / "a").exists()
