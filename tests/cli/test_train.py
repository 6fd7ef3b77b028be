"""`doge train sft|dpo|grpo`: registered, documented, and bad input is a one-line error with exit code 2."""

import pytest

from doge_cli.cli.main import run as main


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_help_names_the_model_option(stage, capsys):
    code, out = run_cli(["train", stage, "--help"], capsys)
    assert code == 0 and "--model" in out and "--resume" in out


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_missing_model_exits_2_with_one_line(stage, tmp_path, capsys):
    code, out = run_cli(["train", stage, "--hardware", "cpu", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--model" in lines[0] and "Traceback" not in out


def test_dpo_without_rejected_exits_2(tmp_path, capsys):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"prompt_input_ids": [[1, 2]], "chosen_input_ids": [[3]]})}).save_to_disk(str(tmp_path / "dpo"))
    code, out = run_cli(["train", "dpo", "--hardware", "cpu", "--model", str(tmp_path / "model"),
                         f"data.path={tmp_path / 'dpo'}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "rejected_input_ids" in out and "Traceback" not in out


def test_unknown_reward_exits_2(tmp_path, capsys):
    code, out = run_cli(["train", "grpo", "--hardware", "cpu", "--model", str(tmp_path / "model"),
                         "grpo.rewards=[{name: acuracy}]", f"output_dir={tmp_path / 'run'}",
                         f"data.path={tmp_path / 'nothing'}"], capsys)
    assert code == 2 and "Traceback" not in out


def test_relaunch_is_built_from_the_parsed_values_not_sys_argv(tmp_path, capsys, monkeypatch):
    """`run(argv=[...])` called from another program relaunches that command, never the host's sys.argv."""
    import subprocess
    import sys
    from pathlib import Path

    launched = []
    monkeypatch.setattr(sys, "argv", ["some-notebook-kernel", "--its-own-flags"])
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    launcher = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "ddp_cpu.yaml"
    from .helpers import run_doge

    code, _, err = run_doge(capsys, "train", "sft", "recipe.yaml", "optim.lr=1e-4", "--model", "runs/pt/final",
                            "-o", str(tmp_path / "run"), "--hardware", "cpu", "--resume", "auto",
                            "--accelerate-config", str(launcher))
    assert code == 0, err
    (cmd,) = launched
    at = cmd.index("doge_cli")
    assert cmd[:at + 1][-4:] == ["--config_file", str(launcher), "-m", "doge_cli"]
    assert cmd[at + 1:] == ["train", "sft", "recipe.yaml", "optim.lr=1e-4", "init_from=runs/pt/final",
                            f"output_dir={tmp_path / 'run'}", "--hardware", "cpu", "--resume", "auto"]


LAUNCHERS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def test_several_machines_are_forwarded_to_accelerate_launch(tmp_path, capsys, monkeypatch):
    import subprocess

    from .helpers import run_doge

    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    code, _, err = run_doge(capsys, "train", "pt", "-o", str(tmp_path / "run"), "--accelerate-config",
                            str(LAUNCHERS / "ddp.yaml"), "--num-machines", "2", "--machine-rank", "1",
                            "--main-process-ip", "10.0.0.1", "--processes-per-machine", "8")
    assert code == 0, err
    (cmd,) = launched
    assert cmd[1:3] == ["-m", "doge_cli.cli.launch"]
    at = cmd.index("doge_cli")
    assert cmd[5:at - 1] == ["--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
                             "--main_process_ip", "10.0.0.1", "--main_process_port", "29500", "--rdzv_backend",
                             "static"]
    assert "--num-machines" not in cmd[at:]  # the training processes get the stage's own arguments only
    # DeepSpeed: one torchrun per machine (its "standard" launcher), not pdsh from one machine; the per-machine
    # count defaults to the config's num_processes (2)
    launched.clear()
    code, _, err = run_doge(capsys, "train", "pt", "-o", str(tmp_path / "run"), "--accelerate-config",
                            str(LAUNCHERS / "zero2.yaml"), "--num-machines", "3", "--rdzv-backend", "c10d",
                            "--main-process-ip", "head")
    assert code == 0, err
    args = launched[0][:launched[0].index("doge_cli")]
    assert args[args.index("--num_processes") + 1] == "6"
    assert args[args.index("--rdzv_backend") + 1] == "c10d"
    assert args[args.index("--deepspeed_multinode_launcher") + 1] == "standard"


@pytest.mark.parametrize("flags, message", [
    (["--num-machines", "2", "--machine-rank", "0", "--main-process-ip", "h"], "need --accelerate-config"),
    (["--accelerate-config", "ddp.yaml", "--machine-rank", "1"], "need --num-machines"),
    (["--accelerate-config", "ddp.yaml", "--num-machines", "2", "--machine-rank", "0"], "needs --main-process-ip"),
    (["--accelerate-config", "ddp.yaml", "--num-machines", "2", "--main-process-ip", "h"], "needs --machine-rank"),
    (["--accelerate-config", "ddp.yaml", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
     "--machine-rank 2 is out of range for --num-machines 2"),
    (["--accelerate-config", "ddp.yaml", "--num-machines", "2", "--machine-rank", "0", "--main-process-ip", "h",
      "--rdzv-backend", "etcd"], "is not one of static, c10d"),
    (["--accelerate-config", "pdsh.yaml", "--num-machines", "2", "--machine-rank", "0", "--main-process-ip", "h"],
     "DeepSpeed's pdsh launcher"),
])
def test_several_machine_flags_that_cannot_work_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    (tmp_path / "pdsh.yaml").write_text((LAUNCHERS / "zero2.yaml").read_text().replace(
        "  zero3_init_flag: false", "  zero3_init_flag: false\n  deepspeed_multinode_launcher: pdsh").replace(
        "configs/accelerate/ds_zero2.json", str(LAUNCHERS / "ds_zero2.json")))
    flags = [str(LAUNCHERS / f) if f == "ddp.yaml" else str(tmp_path / f) if f == "pdsh.yaml" else f for f in flags]
    code, out = run_cli(["train", "pt", "-o", str(tmp_path / "run"), *flags], capsys)
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], out
