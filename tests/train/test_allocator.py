"""keep_large_allocations: a freed 64 MiB tensor's pages are reused instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from doge_cli.train.allocator import keep_large_allocations
applied = keep_large_allocations()
for _ in range(12):  # glibc's heap settles after a few rounds of this pattern
    x = torch.ones(16 * 2**20)  # 64 MiB, above glibc's default mmap threshold
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(16 * 2**20)
    del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> tuple[bool, int]:
    env = dict(os.environ, DOGE_KEEP_ALLOCATIONS="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    applied, kept = _faults(keep=True)
    off, released = _faults(keep=False)
    assert applied and not off
    assert released > 100  # 5 x 64 MiB of fresh pages (even with 2 MiB huge pages: 160 faults)
    assert kept < released / 10


def test_training_on_cpu_turns_it_on(tmp_path, monkeypatch):
    from doge_cli.config import resolve_config
    from doge_cli.errors import DogeError
    from doge_cli.train import core
    from doge_cli.train.objectives import objective_for

    calls = []
    monkeypatch.setattr(core, "keep_large_allocations", lambda: calls.append(1) or True)
    cfg = resolve_config("pt", hardware="cpu", size="1M", overrides=[f"output_dir={tmp_path / 'run'}",
                                                                     f"data.path={tmp_path / 'no-data'}"])
    with pytest.raises(DogeError, match="no dataset"):  # stops at loading the data, after the device is set up
        core.train(cfg, objective_for(cfg))
    assert calls == [1] and not (tmp_path / "run").exists()
