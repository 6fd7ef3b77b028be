"""logging.report_to=[wandb]: the same steps, loss and lr as metrics.jsonl reach wandb (offline mode, read
back from its run file), the config is attached, a resumed run continues the same wandb run without
repeating a step, and a tracker that cannot work is refused before anything is written."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from doge_cli.config import resolve_config
from doge_cli.errors import DogeError
from doge_cli.train.core import train
from doge_cli.train.objectives import objective_for

from .conftest import tiny_overrides

wandb = pytest.importorskip("wandb")


def run(pt_data, out, steps, resume=None, stop_after=None, **extra):
    cfg = resolve_config("pt", hardware="cpu", overrides=tiny_overrides(
        pt_data, out, steps=steps, **{"logging.report_to": "[wandb]", "logging.project": "doge-tests", **extra}))
    return train(cfg, objective_for(cfg), resume=resume, stop_after=stop_after)


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline wandb files (leveldb-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def history(run_dir: Path) -> list[dict]:
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            row["_step"] = record.history.step.num
            rows.append(row)
    return rows


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_gets_the_steps_loss_and_lr_of_metrics_jsonl_and_the_config(pt_data, tmp_path, offline):
    out = tmp_path / "run"
    run(pt_data, out, steps=4)
    rows, logged = history(out), metrics(out)
    assert [r["_step"] for r in rows] == [r["step"] for r in logged] == [1, 2, 3, 4]
    for row, record in zip(rows, logged):
        assert row["loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert row["lr"] == pytest.approx(record["lr"], rel=1e-12)
        assert row["tokens_per_s"] == pytest.approx(record["tokens_per_s"], rel=1e-12)
    keys = set()
    for record in wandb_records(out):  # the config travels in the run record and in config records
        kind = record.WhichOneof("record_type")
        if kind == "run":
            keys |= {item.key for item in record.run.config.update}
        elif kind == "config":
            keys |= {item.key for item in record.config.update}
    assert {"optim", "model", "train", "logging"} <= keys
    state = json.loads((out / "wandb_run.json").read_text())
    assert state["last_step"] == 4 and out.joinpath("wandb").is_dir()


def test_a_resumed_run_continues_the_same_wandb_run_without_repeating_steps(pt_data, tmp_path, offline):
    out = tmp_path / "run"
    run(pt_data, out, steps=4, stop_after=3, **{"checkpoint.every": 2})  # logged 1-3, checkpoint at 2
    first = json.loads((out / "wandb_run.json").read_text())
    run(pt_data, out, steps=4, resume="auto", **{"checkpoint.every": 2})  # retrains 3 and 4
    again = json.loads((out / "wandb_run.json").read_text())
    assert again == {"id": first["id"], "last_step": 4}
    runs = sorted(out.glob("wandb/offline-run-*"))
    # One wandb run, twice opened. wandb names each opening offline-run-<time to the second>-<id>, adding "-1"
    # when both start in the same second: the names are matched without depending on the clock.
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first['id']}(-\d+)?", p.name)
                                  for p in runs), [p.name for p in runs]
    rows = history(out)
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]  # step 3 retrained but not sent again
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics(out)], rel=1e-12)


def test_wandb_missing_or_without_login_is_refused_before_anything_is_written(pt_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(DogeError, match=r"has wandb, which is not installed; install it with: pip install "
                                        r"'doge-cli\[track\]'"):
        run(pt_data, tmp_path / "a", steps=2)
    assert not (tmp_path / "a").exists()
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no wandb login
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(DogeError, match="wandb has no login here; run `wandb login`"):
        run(pt_data, tmp_path / "b", steps=2)
    assert not (tmp_path / "b").exists()
