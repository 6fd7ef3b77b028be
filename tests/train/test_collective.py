"""Which launches make every forward collective, and stopping generation together."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from doge_cli.errors import DogeError
from doge_cli.train import collective
from doge_cli.train.collective import gathers_weights_in_forward, stop_together


def _acc(kind, world=2, stage=None):
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}) if stage is not None else None
    return SimpleNamespace(num_processes=world, distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin),
                           device=torch.device("cpu"), reduce=lambda t, reduction: t * world)


def test_only_zero3_and_fsdp_gather_weights_in_forward():
    assert gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, stage=3))
    assert gathers_weights_in_forward(_acc(DistributedType.FSDP))
    assert not gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, stage=2))
    assert not gathers_weights_in_forward(_acc(DistributedType.MULTI_GPU))
    assert not gathers_weights_in_forward(_acc(DistributedType.DEEPSPEED, world=1, stage=3))
    assert stop_together(_acc(DistributedType.MULTI_GPU)) is None


def test_stop_together_waits_for_every_process():
    all_done = stop_together(_acc(DistributedType.DEEPSPEED, stage=3))
    assert all_done(True) is True  # the fake reduce counts this process twice: 0 pending
    assert all_done(False) is False


# -- start-up decisions taken together (the processes are stood in for by what the gather returns) ---------



def _two(monkeypatch, others, main=True):
    """A 2-process state whose gather returns this process's value and then ``others``."""
    monkeypatch.setattr(collective, "gather", lambda state, value: [value, *others] if main else [*others, value])
    return SimpleNamespace(num_processes=2, is_main_process=main)


def test_agree_one_process_just_runs():
    assert collective.agree(SimpleNamespace(num_processes=1), lambda: 7) == 7
    with pytest.raises(KeyError):
        collective.agree(SimpleNamespace(num_processes=1), lambda: {}["x"])


def test_agree_an_error_on_another_process_stops_this_one_naming_it(monkeypatch):
    where = "process 1 on machine 1 (host b)"
    state = _two(monkeypatch, [("error", "data.path /d does not exist", where)])
    with pytest.raises(DogeError, match=r"^on process 1 on machine 1 \(host b\): data.path /d does not exist$"):
        collective.agree(state, lambda: "fine here")


def test_agree_the_same_error_everywhere_is_said_plainly(monkeypatch):
    state = _two(monkeypatch, [("error", "bad config", "process 1 on machine 0 (host a)")])

    def fails():
        raise DogeError("bad config")

    with pytest.raises(DogeError, match="^bad config$"):
        collective.agree(state, fails)


def test_agree_a_crash_elsewhere_is_one_line_and_keeps_its_traceback_where_it_happened(monkeypatch):
    state = _two(monkeypatch, [("crash", "OSError: disk full", "process 1 on machine 1 (host b)")])
    with pytest.raises(DogeError, match=r"process 1 on machine 1 \(host b\) failed \(OSError: disk full\); its own"):
        collective.agree(state, lambda: None)
    state = _two(monkeypatch, [("ok", None, "")])
    with pytest.raises(ZeroDivisionError):  # this process's own crash: the real exception, traceback and all
        collective.agree(state, lambda: 1 / 0)


def test_agree_main_only_shares_the_main_decision(monkeypatch):
    state = _two(monkeypatch, [("ok", True, "")], main=False)
    ran = []
    assert collective.agree(state, lambda: ran.append(1), main_only=True) is True
    assert ran == []  # not run on the other processes
    state = _two(monkeypatch, [("error", "output_dir r already holds a doge run", "process 0")], main=False)
    with pytest.raises(DogeError, match="^output_dir r already holds a doge run$"):
        collective.agree(state, lambda: None, main_only=True)


def test_fingerprints_tell_copies_from_other_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "manifest.json").write_text('{"n": 1}')
        (d / "sub" / "data.bin").write_bytes(b"x" * 10)
    assert collective.fingerprint(a) == collective.fingerprint(b)  # identical copies are the same data
    assert collective.fingerprint(tmp_path / "nope") == "missing" and collective.fingerprint(None) is None
    (b / "manifest.json").write_text('{"n": 2}')
    assert collective.describe_difference(collective.fingerprint(b), collective.fingerprint(a)) == \
        "has another manifest.json (8 bytes against 8)"
    (b / "manifest.json").write_text('{"n": 1}')
    (b / "sub" / "data.bin").unlink()
    assert collective.describe_difference(collective.fingerprint(b), collective.fingerprint(a)) == "lacks sub/data.bin"
    assert collective.describe_difference("missing", collective.fingerprint(a)) == "does not exist there"


def test_peer_failures_are_told_from_other_errors():
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:40158: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker.")
    assert collective.peer_failure(gloo) == "Read error [127.0.0.1]:40158: Connection reset by peer."
    hung = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation")
    assert collective.peer_failure(hung) == "Timed out waiting 20000ms for recv operation"
    assert collective.peer_failure(torch.distributed.DistNetworkError("store gone")) == "store gone"
    assert collective.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert collective.peer_failure(ValueError("connection reset by peer")) is None
