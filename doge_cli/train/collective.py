"""What the processes of a distributed run must do together.

DeepSpeed ZeRO-3 and FSDP keep each weight in pieces across processes and gather it inside every
forward pass, collectively: every process must run the same number of forwards, or the ones that
stop early leave the others waiting for ever. Generation (GRPO rollouts, samples) therefore stops
only when every process is done, and evaluation gives every process the same number of batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def gathers_weights_in_forward(acc) -> bool:
    """True under DeepSpeed ZeRO-3 and FSDP: forwards are collective operations."""
    from accelerate.utils import DistributedType

    if acc.num_processes == 1:
        return False
    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = acc.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    return False


def stop_together(acc) -> Callable[[bool], bool] | None:
    """For ``generate(stop_together=...)``: True once every process is done, where forwards are
    collective; None (each process stops on its own) everywhere else."""
    if not gathers_weights_in_forward(acc):
        return None

    def all_done(done: bool) -> bool:
        pending = torch.tensor(0.0 if done else 1.0, device=acc.device)
        return float(acc.reduce(pending, reduction="sum")) == 0.0

    return all_done


# -- start-up decisions taken together ----------------------------------------------------------------
#
# Every process of a run takes the start-up decisions together: a check that fails on one machine (a
# missing file, no GPU there) stops every process with the same one line naming that machine, instead of
# leaving the others waiting at their next collective step for ``runtime.dist_timeout``; the decisions
# about the run folder are taken once, by the main process, and shared.


def _world(state) -> int:
    return int(getattr(state, "num_processes", 1))


def whereabouts(rank: int | None = None, host: str | None = None, machine: str | None = None) -> str:
    """``process R on machine M (host H)``, for messages about one process of a distributed run."""
    import socket

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    host = socket.gethostname() if host is None else host
    machine = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "?")) if machine is None else machine
    return f"process {rank} on machine {machine} (host {host})"


def gather(state, value: Any) -> list[Any]:
    """``value`` of every process, in rank order (a picklable object; every process must call this)."""
    if _world(state) == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * _world(state)
    dist.all_gather_object(out, value)
    return out


def agree(state, fn: Callable[[], Any], *, main_only: bool = False) -> Any:
    """Run ``fn`` on every process (``main_only``: on the main process, its result given to all) and share
    the outcome: when it raised on any process, every process raises. A DogeError keeps its one line, prefixed
    with the process that raised it when the others did not; any other exception keeps its traceback where
    it happened and is one line naming that process everywhere else."""
    from doge_cli.errors import DogeError

    if _world(state) == 1:
        return fn()
    outcome: tuple[str, Any, str] | None = None
    crash: BaseException | None = None
    if not main_only or state.is_main_process:
        try:
            outcome = ("ok", fn(), "")
        except DogeError as err:
            outcome = ("error", str(err), whereabouts())
        except Exception as err:  # shared as one line, re-raised below with its traceback
            crash = err
            first = str(err).splitlines()[0][:200] if str(err) else ""
            outcome = ("crash", f"{type(err).__name__}: {first}", whereabouts())
    outcomes = gather(state, outcome)
    failed = [o for o in outcomes if o is not None and o[0] != "ok"]
    if failed:
        if crash is not None:
            raise crash
        kind, message, where = failed[0]
        if kind == "crash":
            raise DogeError(f"{where} failed ({message}); its own output has the traceback")
        everywhere = len(failed) == len([o for o in outcomes if o is not None])
        raise DogeError(message if everywhere or main_only else f"on {where}: {message}")
    return outcomes[0][1] if main_only else outcome[1]


def spans_machines(state) -> bool:
    """True when the processes of this run live on more than one machine (torchrun's LOCAL_WORLD_SIZE is
    below the world size, or the processes report different host names)."""
    import socket

    world = _world(state)
    if world == 1:
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    hosts = gather(state, socket.gethostname())
    return local < world or len(set(hosts)) > 1


def fingerprint(path: str | os.PathLike | None) -> Any:
    """What a process sees at ``path``: None for no path or a hub id (not a local path anywhere), "missing",
    or the sorted (relative name, bytes, xxh3 of files up to 1 MiB) of its files. Identical copies on every
    machine give the same fingerprint as one shared folder."""
    import xxhash

    if path is None:
        return None
    p = Path(str(path)).expanduser()
    if not p.exists():
        return "missing"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    out = []
    for f in files:
        size = f.stat().st_size
        digest = xxhash.xxh3_64_hexdigest(f.read_bytes()) if size <= 1 << 20 else None
        out.append((f.relative_to(p).as_posix() if f != p else f.name, size, digest))
    return out


def describe_difference(mine: Any, theirs: Any) -> str:
    """How fingerprint ``mine`` differs from ``theirs`` (the main process's), in words."""
    if mine == "missing":
        return "does not exist there"
    if theirs == "missing":
        return "exists there but not for process 0"
    a = {name: (size, digest) for name, size, digest in mine}
    b = {name: (size, digest) for name, size, digest in theirs}
    for name in sorted(set(a) | set(b)):
        if name not in a:
            return f"lacks {name}"
        if name not in b:
            return f"has {name}, which process 0 does not"
        if a[name] != b[name]:
            return f"has another {name} ({a[name][0]:,} bytes against {b[name][0]:,})"
    return "differs"


def check_same_run(state, run_dir: Path, inputs: dict[str, Any], settings: str) -> None:
    """Before anything is written: every process runs the same settings and, across machines, sees the same
    run folder (a file the main process writes there is read by all: the folder must be on storage every
    machine shares, since checkpoints hold each process's state) and the same inputs (shared, or identical
    copies). One line names the process that does not and what differs."""
    import hashlib
    import secrets

    from doge_cli.errors import DogeError

    if _world(state) == 1:
        return
    digests = gather(state, hashlib.sha256(settings.encode()).hexdigest())
    if len(set(digests)) > 1:
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        wheres = gather(state, whereabouts())
        raise DogeError(f"{wheres[other]} was started with other settings than process 0 (config, recipe, "
                        "overrides or --resume/--overwrite); run the same doge command on every machine")
    if not spans_machines(state):
        return
    # The run folder: a probe file with a random name and content, written where the run folder is (or the
    # nearest folder above it that exists), read by every process at the same place relative to its run folder.
    run_dir = Path(run_dir).expanduser().absolute()

    def write_probe() -> tuple[str, str, str, str]:
        probe_name = f".doge-shared-check-{secrets.token_hex(8)}"
        up = 0
        at = run_dir
        while not at.is_dir():
            at, up = at.parent, up + 1
        token = secrets.token_hex(16)
        try:
            (at / probe_name).write_text(token, encoding="utf-8")
        except OSError as err:
            raise DogeError(f"cannot write in {at} ({err.strerror or err}), where output_dir {run_dir} is to be "
                            "created; choose a writable output_dir") from None
        return str(up), probe_name, token, whereabouts()

    up, probe_name, token, main_where = agree(state, write_probe, main_only=True)
    probe = run_dir
    for _ in range(int(up)):
        probe = probe.parent
    probe = probe / probe_name
    try:
        seen = probe.read_text(encoding="utf-8") if probe.is_file() else None
        views = gather(state, (seen == token, whereabouts()))
    finally:
        if state.is_main_process:
            probe.unlink(missing_ok=True)
    blind = [where for ok, where in views if not ok]
    if blind:
        raise DogeError(f"output_dir {run_dir} is not on storage every machine shares: {blind[0]} does not see the "
                        f"file {main_where.split(' (')[0]} wrote at {probe.parent}; put the run folder on a "
                        "filesystem every machine mounts at the same path (NFS, Lustre, ...)")
    prints = gather(state, ({name: fingerprint(path) for name, path in inputs.items()}, whereabouts()))
    for name, path in inputs.items():
        ref = prints[0][0][name]
        for seen_there, where in prints[1:]:
            if seen_there[name] != ref:
                raise DogeError(f"{name} {path} differs between machines: on {where} it "
                                f"{describe_difference(seen_there[name], ref)}; every machine must read the same "
                                "files (shared storage, or identical copies)")


# -- a process lost ------------------------------------------------------------------------------------

# What gloo and the c10d store say when a peer is gone (its sockets closed) or did not answer in time.
_PEER_SIGNS = ("connection reset by peer", "connection closed by peer", "timed out waiting", "broken pipe",
               "gloo/transport")


def peer_failure(err: BaseException) -> str | None:
    """A short reason when ``err`` is a collective operation failing because another process of the run died
    or hung (torch's DistError family, or gloo's RuntimeError), else None."""
    import torch.distributed as dist

    text = " ".join(str(err).split())
    distributed = isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(sign in text.lower() for sign in _PEER_SIGNS))
    if not distributed:
        return None
    text = text.split("] ", 1)[-1] if text.startswith("[") else text  # gloo's source location
    for tail in (" This is typically caused", " Check the logs"):
        text = text.split(tail)[0]
    return text[:200]
