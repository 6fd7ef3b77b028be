import subprocess
import sys

import yaml
from typer.testing import CliRunner

from doge_cli.cli.main import app

runner = CliRunner()


def doge(*args):
    """Run the real entry point so exit codes and stderr are what a user sees."""
    return subprocess.run([sys.executable, "-m", "doge_cli", *args], capture_output=True, text=True)


def test_show_pt_20m_rtx4090():
    result = runner.invoke(app, ["config", "show", "pt", "--size", "20M", "--hardware", "rtx4090"])
    assert result.exit_code == 0, result.output
    assert "256 sequences x 2048 tokens = 524,288 tokens" in result.output
    data = yaml.safe_load(result.output)
    assert data["model"]["hidden_size"] == 256 and data["model"]["num_hidden_layers"] == 8
    assert data["optim"]["lr"] == 8e-3 and data["schedule"]["name"] == "warmup_stable_decay"
    assert data["train"]["max_steps"] == 8000 and data["train"]["global_batch_size"] == 256


def test_show_with_recipe_overrides_and_save(tmp_path):
    out = tmp_path / "resolved.yaml"
    result = runner.invoke(app, ["config", "show", "sft", "configs/doge/Doge-60M/sft.yaml", "optim.lr=1e-4",
                                 "--hardware", "cpu", "--save", str(out)])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load(out.read_text())
    assert saved["optim"]["lr"] == 1e-4 and saved["model"]["hidden_size"] == 512
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_explain_prints_docs():
    result = runner.invoke(app, ["config", "show", "dpo", "--size", "20M", "--hardware", "cpu", "--explain"])
    assert result.exit_code == 0
    assert "# Strength of the implicit KL penalty to the reference model." in result.output


def test_errors_are_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    cases = [
        ("config", "show", "pt", "optim.lrr=1", "--hardware", "cpu"),
        ("config", "show", "pt", "--size", "7B", "--hardware", "cpu"),
        ("config", "show", "pt", "--hardware", "tpu"),
        ("config", "show", "pt", str(bad), "--hardware", "cpu"),
        ("config", "show", "pt", str(tmp_path / "missing.yaml"), "--hardware", "cpu"),
        ("config", "show", "xx", "--hardware", "cpu"),
        ("config", "show", "pt", "--hardware", "cpu", "--save", str(tmp_path / "no" / "dir.yaml")),
    ]
    for args in cases:
        result = doge(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("doge: error: "), (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "no").exists()


def test_env_json():
    import json

    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["torch"].startswith("2.") and "cpu features" in info and "hub" in info
