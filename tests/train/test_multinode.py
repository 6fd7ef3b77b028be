"""Two machines on this host: two `doge train` commands with --num-machines 2 and machine ranks 0 and 1,
one process each, rendezvous on 127.0.0.1 (gloo), against one machine running two processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, launch_train, tiny_overrides

STEPS = 40
SETTINGS = {"runtime.micro_batch_size": 1, "logging.eval_every": 10, "logging.eval_batches": 3,
            "optim.max_grad_norm": 0.05, "checkpoint.every": 5}
ENV = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
COMPARED = ("step", "loss", "grad_norm", "lr", "eval_loss", "tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cmd(data, out, rank, port, launcher="ddp_cpu.yaml", *extra, **settings):
    over = tiny_overrides(data, out, steps=STEPS, **{**SETTINGS, **settings})
    return [sys.executable, "-m", "doge_cli", "train", "pt", "--hardware", "cpu", *over,
            "--accelerate-config", str(ROOT / "configs" / "accelerate" / launcher), "--num-machines", "2",
            "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port", str(port),
            "--processes-per-machine", "1", *extra]


def start_machines(data, outs, launcher="ddp_cpu.yaml", *extra, **settings):
    port = free_port()
    return [subprocess.Popen(machine_cmd(data, out, rank, port, launcher, *extra, **settings), env=ENV, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for rank, out in enumerate(outs)]


def finish(procs, timeout=600):
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        results.append((proc.returncode, out, err))
    return results


def records(out):
    import json

    return [{k: r.get(k) for k in COMPARED} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def same_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "final" / "model.safetensors")), load_file(str(b_dir / "final" / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_machine(pt_data, tmp_path_factory):
    """The reference: one machine, two processes (and the same under ZeRO-2)."""
    out = {}
    for launcher in ("ddp_cpu.yaml", "zero2.yaml"):
        run = tmp_path_factory.mktemp("one") / "run"
        launch_train("pt", tiny_overrides(pt_data, run, steps=STEPS, **SETTINGS), run, launcher)
        out[launcher] = run
    return out


@pytest.fixture(scope="module")
def two_machines(pt_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("two") / "run"
    results = finish(start_machines(pt_data, [run, run]))
    return run, results


def test_two_machines_equal_one_machine_bit_for_bit(two_machines, one_machine):
    run, results = two_machines
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    assert "x 2 processes" in results[0][1]
    assert records(run) == records(one_machine["ddp_cpu.yaml"])
    assert same_weights(run, one_machine["ddp_cpu.yaml"])
    # each machine's process wrote its own state into the shared run folder
    ckpt = run / "checkpoints" / f"step-{STEPS:06d}"
    assert not ckpt.exists() or {"rank-00000.pt", "rank-00001.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not list(run.parent.glob(".doge-shared-check-*")) and not list(run.glob(".doge-shared-check-*"))


def test_two_machines_under_zero2(pt_data, tmp_path, one_machine):
    run = tmp_path / "run"
    for code, _out, err in finish(start_machines(pt_data, [run, run], "zero2.yaml")):
        assert code == 0, err[-3000:]
    assert records(run) == records(one_machine["zero2.yaml"])
    assert same_weights(run, one_machine["zero2.yaml"])


def worker_of(launcher: subprocess.Popen) -> int:
    """The training process a machine's `doge train` launched (under accelerate launch and torchrun)."""
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "doge_cli" in cmd and "accelerate" not in cmd:
                return child.pid
        time.sleep(0.05)
    raise AssertionError("no training process appeared")


def wait_for(path, procs, timeout=180):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run ended before the checkpoint"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_process_stops_the_other_machine_in_bounded_time(pt_data, tmp_path, two_machines, how):
    """SIGKILL (noticed at once) or SIGSTOP (noticed after runtime.dist_timeout) of machine 1's process: machine 0
    stops within the timeout with one line saying what happened; after the kill, --resume auto on both machines
    ends bit for bit where the uninterrupted run did."""
    timeout = 20  # seconds; a hung peer costs this much of the suite
    run = tmp_path / "run"
    procs = start_machines(pt_data, [run, run], **{"runtime.dist_timeout": timeout})
    try:
        victim = worker_of(procs[1])
        wait_for(run / "checkpoints" / "step-000010", procs)
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        lost = time.time()
        code, out, err = finish(procs[:1], timeout=timeout + 60)[0]
        took = time.time() - lost
    finally:
        # torchrun starts its workers in sessions of their own: the stopped one is killed by its pid
        for pid in (victim,) if "victim" in locals() else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
    assert code == 1, err[-3000:]  # PeerLost's code, passed on by the launcher
    assert took < timeout + (10 if how == "killed" else 30), took
    lines = [ln for ln in err.splitlines() if ln.startswith("doge: error:")]
    assert lines and "lost one of its 2 processes at step" in lines[0] and "--resume auto" in lines[0], err[-3000:]
    if how == "hung":
        assert "timed out" in lines[0].lower(), lines[0]
        return  # resuming after a hang is resuming after a kill, tested below
    assert took < timeout, took  # a dead peer's closed sockets are noticed without waiting for the timeout
    for code, out, err in finish(start_machines(pt_data, [run, run], "ddp_cpu.yaml", "--resume", "auto")):
        assert code == 0, err[-3000:]
        assert "resumed from" in out or not out
    assert records(run) == records(two_machines[0])
    assert same_weights(run, two_machines[0])


def test_a_machine_that_does_not_share_the_run_folder_is_refused(pt_data, tmp_path):
    """Two local folders at the same place stand in for machines without shared storage."""
    (tmp_path / "m0").mkdir()
    (tmp_path / "m1").mkdir()
    results = finish(start_machines(pt_data, [tmp_path / "m0" / "run", tmp_path / "m1" / "run"]))
    for code, _out, err in results:
        assert code == 2, err[-3000:]  # the training process's code for bad input, passed on by the launcher
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.startswith("doge: error:")]
        assert lines and "is not on storage every machine shares: process 1 on machine 1" in lines[0], err[-3000:]
    assert not [p for m in ("m0", "m1") for p in (tmp_path / m).iterdir()]  # nothing written, the probe removed


def test_a_machine_with_other_data_is_refused(pt_data, tmp_path):
    """The same relative data.path on both machines (each its own working folder), with other files on machine 1."""
    import shutil

    for machine in ("m0", "m1"):
        shutil.copytree(pt_data, tmp_path / machine / "data")
    changed = tmp_path / "m1" / "data" / "dataset_dict.json"
    changed.write_text(changed.read_text() + "\n")
    port = free_port()
    run = tmp_path / "run"
    procs = [subprocess.Popen(machine_cmd("data", run, rank, port), env=ENV, cwd=tmp_path / machine,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank, machine in enumerate(("m0", "m1"))]
    for code, _out, err in finish(procs):
        assert code == 2
        lines = [ln for ln in err.splitlines() if ln.startswith("doge: error:")]
        assert lines and "data.path data differs between machines: on process 1 on machine 1" in lines[0], err[-3000:]
        assert "has another dataset_dict.json" in lines[0]
    assert not run.exists()


def test_the_slurm_script_trains_the_same_run(pt_data, tmp_path, two_machines):
    """configs/slurm/train.sbatch under a stand-in Slurm whose two nodes are this host: the run equals the
    two-machine run started by hand."""
    from tests.configs.test_slurm import SCRIPT, stub_slurm

    env, _ = stub_slurm(tmp_path, hosts="127.0.0.1 127.0.0.1")
    env.update(ENV, PATH=env["PATH"], DOGE=f"{sys.executable} -m doge_cli", GPUS_PER_NODE="1",
               ACCELERATE_CONFIG=str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), MAIN_PORT=str(free_port()))
    run = tmp_path / "run"
    result = subprocess.run(["bash", str(SCRIPT), "pt", "--hardware", "cpu",
                             *tiny_overrides(pt_data, run, steps=STEPS, **SETTINGS)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(run) == records(two_machines[0])
    assert same_weights(run, two_machines[0])


def test_the_run_folder_is_judged_once_for_every_machine(pt_data, two_machines):
    """An existing run without --resume/--overwrite: the main process decides, and every machine says the same."""
    run = two_machines[0]
    before = (run / "metrics.jsonl").read_bytes()
    for code, _out, err in finish(start_machines(pt_data, [run, run])):
        assert code == 2
        lines = [ln for ln in err.splitlines() if ln.startswith("doge: error:")]
        assert lines == [f"doge: error: output_dir {run} already holds a doge run; pass --resume auto to continue "
                         "it, --overwrite to replace it, or choose another output_dir"], err[-3000:]
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_machine_started_with_other_settings_is_refused(pt_data, tmp_path):
    port = free_port()
    run = tmp_path / "run"
    procs = [subprocess.Popen(machine_cmd(pt_data, run, rank, port, **{"optim.lr": lr}), env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank, lr in enumerate((3e-3, 1e-3))]
    for code, _out, err in finish(procs):
        assert code == 2
        lines = [ln for ln in err.splitlines() if ln.startswith("doge: error:")]
        assert lines and "process 1 on machine 1" in lines[0] and "other settings than process 0" in lines[0], err
    assert not run.exists()
