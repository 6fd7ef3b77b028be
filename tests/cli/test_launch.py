"""doge's wrapper of `accelerate launch`: the failing training process's exit code comes back, without the
launcher's traceback; a process killed by a signal is named in one line."""

import subprocess

import pytest

from doge_cli.cli import launch


def fail_with(monkeypatch, error):
    import accelerate.commands.launch as accelerate_launch

    def launch_command(args):
        raise error

    monkeypatch.setattr(accelerate_launch, "launch_command", launch_command)


def child_failed(exitcode):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("doge_cli", {3: ProcessFailure(local_rank=3, pid=1234, exitcode=exitcode,
                                                           error_file="")})


@pytest.mark.parametrize("exitcode, code, said", [
    (2, 2, None),  # bad input: the process's own "doge: error:" line is the explanation
    (1, 1, None),  # a lost peer: likewise
    (-9, 1, "training process 3 of this machine was killed by SIGKILL"),
    (-6, 1, "was killed by SIGABRT"),
    (137, 137, "training process 3 of this machine exited with code 137"),
])
def test_the_failing_process_decides_the_exit_code(monkeypatch, capsys, exitcode, code, said):
    fail_with(monkeypatch, child_failed(exitcode))
    assert launch.main(["--config_file", "x.yaml", "-m", "doge_cli", "train", "pt"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if said is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and said in err


def test_a_single_process_launcher_failure_passes_its_code(monkeypatch, capsys):
    fail_with(monkeypatch, subprocess.CalledProcessError(returncode=3, cmd=["python"]))
    assert launch.main(["-m", "doge_cli", "train", "pt"]) == 3
    assert "a training process exited with code 3" in capsys.readouterr().err


def test_success_is_zero(monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    seen = []
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: seen.append(args))
    assert launch.main(["--num_machines", "2", "-m", "doge_cli", "train", "pt"]) == 0
    assert seen[0].num_machines == 2 and seen[0].training_script == "doge_cli"
