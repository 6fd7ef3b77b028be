"""``accelerate launch``, run by doge in a process of its own (``python -m doge_cli.cli.launch ARGS``).

The arguments are accelerate's, unchanged; what differs is how a failure ends. accelerate lets torchrun's
``ChildFailedError`` (or a ``CalledProcessError``) escape with a traceback of the launcher's own frames and
exits with code 1 whatever the training process said. Here the failing process's exit code is passed on (2
for bad input, 1 for a lost peer: the codes doge's commands use), its own ``doge: error:`` line stays the
explanation, and a process that was killed by a signal is named in one line.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = int(failure.exitcode)
    except subprocess.CalledProcessError as err:
        rank, code = None, int(err.returncode)
    else:
        return 0
    who = "a training process" if rank is None else f"training process {rank} of this machine"
    if code not in (1, 2):  # 2 and 1 are doge's own: its "doge: error:" line above says what happened
        print(f"doge: {who} {_describe(code)}; the lines above say why", file=sys.stderr, flush=True)
    return code if 0 < code < 256 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
