"""Shared helpers of the CLI tests."""

import pytest

from doge_cli.cli.main import run


def run_doge(capsys, *args):
    """Run the real entry point in-process: (exit code, stdout, stderr) as a user sees them."""
    with pytest.raises(SystemExit) as exc:
        run(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
