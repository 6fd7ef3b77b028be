"""Checkpoints that are either complete or absent.

A checkpoint is written into ``RUN/checkpoints/.tmp-step-NNNNNN`` and renamed to
``step-NNNNNN`` only once every file is on disk, so a run killed mid-write leaves a temporary
folder that ``--resume auto`` ignores (and the next save removes).

Contents: ``model.safetensors`` (the unwrapped model's weights), ``optimizer.pt`` and
``rng.pt`` (tensors and plain numbers only, so they load with ``torch.load(weights_only=True)``),
``state.json`` (step, data position, scheduler step, metrics so far) and ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from doge_cli.errors import DogeError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(int(x) for x in state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write a complete checkpoint atomically, then prune all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    tmp.mkdir()
    try:
        # safetensors refuses shared storage (tied embeddings): store each tensor once, contiguously.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DogeError(f"could not write checkpoint {final}: {err.strerror or err}") from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no arbitrary unpickling)."""
    from safetensors.torch import load_file

    path = Path(path)
    needed = ["model.safetensors", "optimizer.pt", "rng.pt", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise DogeError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                        "pass --resume auto to use the newest complete one")
    try:
        return {
            "model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
            "state": json.loads((path / STATE_FILE).read_text(encoding="utf-8")),
            "config_yaml": (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").exists() else "",
        }
    except (OSError, ValueError, RuntimeError) as err:
        raise DogeError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                        "delete it or resume from another one") from None
