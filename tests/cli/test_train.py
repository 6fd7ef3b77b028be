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
