"""configs/slurm/train.sbatch run with a stand-in Slurm (no cluster here): `srun` and `scontrol` are small
scripts that record what they are given and run the task once per node, as Slurm would."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "configs" / "slurm" / "train.sbatch"

SRUN = r'''#!/usr/bin/env python3
"""Stand-in srun: record argv, then run the task once per node with SLURM_NODEID set, all at once; end the
others when one fails (as --kill-on-bad-exit=1 asks) and exit with the first failure's code."""
import json, os, subprocess, sys, time
log = os.environ["STUB_LOG"]
with open(os.path.join(log, "srun.json"), "w") as f:
    json.dump(sys.argv[1:], f)
args = sys.argv[1:]
task = next(i for i, a in enumerate(args) if not a.startswith("-"))
procs = [subprocess.Popen(args[task:], env={**os.environ, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n)})
         for n in range(int(os.environ["SLURM_NNODES"]))]
code = 0
while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and "--kill-on-bad-exit=1" in args[:task]:
        code = failed[0]
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.05)
sys.exit(code or next((p.returncode for p in procs if p.returncode), 0))
'''

SCONTROL = '''#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 1
printf '%s\\n' $STUB_HOSTS
'''

DOGE = r'''#!/usr/bin/env python3
import json, os, sys
keep = ("SLURM_NODEID", "HF_HUB_OFFLINE")
with open(os.path.join(os.environ["STUB_LOG"], f"doge-{os.environ['SLURM_NODEID']}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keep}}, f)
'''


def stub_slurm(tmp_path, hosts="node-a node-b"):
    """A bin folder with srun and scontrol, and the environment sbatch would give a 2-node job."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("doge-stub", DOGE)):
        (bin_dir / name).write_text(text.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_LOG=str(log), STUB_HOSTS=hosts, SLURM_NNODES="2",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_GPUS_ON_NODE="8")
    return env, log


def test_one_launcher_per_node_with_ranks_and_rendezvous_from_slurm(tmp_path):
    env, log = stub_slurm(tmp_path)
    env["DOGE"] = str(tmp_path / "bin" / "doge-stub")
    result = subprocess.run(["bash", str(SCRIPT), "pt", "configs/doge/Doge-160M/pt.yaml", "--hardware", "h100",
                             "optim.lr=1e-3", "--resume", "auto"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    srun = json.loads((log / "srun.json").read_text())
    assert "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    for node in (0, 1):
        seen = json.loads((log / f"doge-{node}.json").read_text())
        assert seen["argv"] == ["train", "pt", "configs/doge/Doge-160M/pt.yaml", "--hardware", "h100", "optim.lr=1e-3",
                                "--resume", "auto", "--accelerate-config", "configs/accelerate/ddp.yaml",
                                "--num-machines", "2", "--machine-rank", str(node), "--main-process-ip", "node-a",
                                "--main-process-port", "29500", "--processes-per-machine", "8"]
        assert seen["env"] == {"SLURM_NODEID": str(node), "HF_HUB_OFFLINE": "1"}
    assert "2 machines x 8 processes, rendezvous at node-a:29500" in result.stderr


def test_settings_from_the_environment(tmp_path):
    env, log = stub_slurm(tmp_path, hosts="gpu17 gpu18")
    env.update(DOGE=str(tmp_path / "bin" / "doge-stub"), ACCELERATE_CONFIG="configs/accelerate/zero2.yaml",
               GPUS_PER_NODE="4", MAIN_PORT="29999")
    result = subprocess.run(["bash", str(SCRIPT), "sft", "--model", "runs/pt/final"], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = json.loads((log / "doge-1.json").read_text())["argv"]
    assert argv[:4] == ["train", "sft", "--model", "runs/pt/final"]
    pairs = dict(zip(argv[4::2], argv[5::2]))
    assert pairs == {"--accelerate-config": "configs/accelerate/zero2.yaml", "--num-machines": "2",
                     "--machine-rank": "1", "--main-process-ip": "gpu17", "--main-process-port": "29999",
                     "--processes-per-machine": "4"}


def test_refuses_to_run_outside_slurm_or_without_a_stage(tmp_path):
    env, _ = stub_slurm(tmp_path)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    del env["SLURM_JOB_NODELIST"]
    result = subprocess.run(["bash", str(SCRIPT), "pt"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "run this script with sbatch" in result.stderr
