import subprocess
import sys

import pytest
from typer.testing import CliRunner

from doge_cli import __version__
from doge_cli.cli.main import app

runner = CliRunner()


def command_paths(group=None, prefix=()):
    """Every registered command path, found through typer's public API."""
    import typer.main

    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, path):
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, ())
    return paths


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "doge")
def test_help_of_every_command_renders(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_the_top_help_lists_the_commands_in_pipeline_order_one_sentence_each():
    result = runner.invoke(app, ["--help"], terminal_width=120, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    box = result.output.split("Commands")[1]
    rows = [ln.strip("│ ").rstrip() for ln in box.splitlines() if ln.startswith("│")]
    names = [row.split()[0] for row in rows]
    assert names == ["data", "train", "eval", "chat", "serve", "upcycle", "average", "report", "push", "config", "env"]
    for row in rows:  # one line each, a whole sentence
        text = row.split(None, 1)[1].rstrip("│ ")
        assert text.endswith(".") and text.count(". ") == 0, row


def test_expected_groups_are_registered():
    paths = {" ".join(p) for p in command_paths()}
    assert {"config", "config show", "env"} <= paths


def test_importing_the_cli_does_not_import_heavy_libraries():
    code = (
        "import sys, doge_cli.cli.main as m; "
        "heavy = [k for k in ('torch', 'transformers', 'datasets', 'accelerate', 'trl', 'deepspeed', 'lighteval') "
        "if k in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "doge_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "config" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "pt", "--bogus"], "No such option: --bogus"),
    (["eval", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    (["chat"], "Missing argument 'model'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_two_lines_and_exit_2(capsys, argv, message):
    from .helpers import run_doge

    code, out, err = run_doge(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 2 and message in lines[0] and lines[0].startswith("doge: error: ")
    assert lines[1].startswith("Try '") and lines[1].endswith("--help' for help.")
