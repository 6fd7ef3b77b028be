"""User-facing errors.

Anything the user can fix (a bad flag, config, path, data file or checkpoint) raises
:class:`DogeError` with a one-line message that says what is wrong and how to fix it. The CLI
entry point prints that line and exits with code 2, without a traceback. Programming errors
are left as ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations


class DogeError(Exception):
    """A problem with the user's input; ``str(err)`` is the one-line message shown."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep messages on one line whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


class PeerLost(DogeError):
    """A distributed run lost one of its processes (killed, crashed, its machine gone) or waited longer than
    ``runtime.dist_timeout`` for one that hung. Not the user's input: exit code 1; the message says how to
    continue."""

    exit_code = 1
