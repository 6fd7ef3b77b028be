"""Checkpoints that are either complete or absent, for every distribution mode.

Layout of ``RUN/checkpoints/step-NNNNNN/``:

- weights and optimizer state: ``model.safetensors`` (the unwrapped model, never a compile wrapper's
  prefixed names) and ``optimizer.pt`` when one process holds them whole (one process, DDP); under
  DeepSpeed or FSDP, which shard them across processes, the files ``accelerate.save_state`` writes;
- ``rank-NNNNN.pt`` for every process: its RNG states and the metric sums of the logging window
  not yet logged, so a resumed run logs exactly what a straight run logs;
- ``config.yaml``: the resolved config of the run;
- ``state.json``: step, data position, last losses, and the size and xxh3-128 checksum of every other
  file; written last, so its presence marks a complete checkpoint.

Everything is written into ``.tmp-step-NNNNNN``, flushed to disk (``fsync`` of every file and folder)
and renamed once complete, so a run killed mid-write, or a machine that loses power, leaves a
temporary folder that ``--resume auto`` ignores (and the next save removes). ``*.pt`` files hold
tensors and plain Python values only and are read with ``torch.load(weights_only=True)``.

Reading (:func:`load`) verifies every file against its recorded size and checksum (a zeroed page or a
flipped byte would otherwise still load), checks every piece and names the one that is broken;
:func:`pick_resume` falls back from a broken newest checkpoint to the newest one that verifies and
reads completely.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from doge_cli.errors import DogeError

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose state.json exists (complete once written), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


# ------------------------------------------------------------------------------------------ RNG


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


# ------------------------------------------------------------------------------------------ write


def save(acc, run_dir: Path, step: int, *, model, optimizer, sharded: bool, rank_state: dict[str, Any],
         state: dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint ``step`` with every process taking part (collective), then prune old ones.

    ``model`` is the prepared model without any compile wrapper; ``rank_state`` this process's own
    state (its logging window), stored with its RNG states in ``rank-NNNNN.pt``.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        if sharded:  # DeepSpeed / FSDP: accelerate knows how its shards are laid out
            acc.save_state(str(tmp))
        elif acc.is_main_process:
            from safetensors.torch import save_file

            # safetensors refuses shared storage (tied embeddings): store each tensor once, contiguously.
            weights = acc.unwrap_model(model).state_dict()
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save({"rng": rng_state(), **rank_state}, tmp / rank_file(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            # Every file's size and checksum (and so the list of what doge wrote): resume verifies them, so
            # a file a lost power or a bad disk left zeroed or flipped is found, not loaded.
            files = checksums(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "world_size": acc.num_processes, "sharded": sharded,
                                                      "files": files}, indent=2), encoding="utf-8")
            sync_tree(tmp)  # the data on disk before the rename that makes the checkpoint count
            if final.exists():
                _remove_ours(final)
            tmp.rename(final)
            sync_dir(root)
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if foreign_in_checkpoint(old):
                    logger.warning("keeping %s: it holds %s, which doge did not write there", old,
                                   foreign_in_checkpoint(old)[0])
                    continue
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DogeError(f"could not write checkpoint {final}: {err.strerror or err}") from None
    acc.wait_for_everyone()
    return final


def checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "xxh3"}}`` of every file under ``folder`` (xxh3-128: several GB/s)."""
    import xxhash

    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "xxh3": digest.hexdigest()}
    return out


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and itself)."""
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            sync_dir(path)
    sync_dir(folder)


def sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def foreign_in_checkpoint(path: Path) -> list[str]:
    """Files in a checkpoint folder that its state.json does not list (none for a checkpoint that lists none)."""
    try:
        listed = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(listed, dict):
        return []
    present = {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()}
    return sorted(present - set(listed) - {STATE_FILE})


def _remove_ours(path: Path) -> None:
    foreign = foreign_in_checkpoint(path)
    if foreign:
        raise DogeError(f"checkpoint {path} holds {foreign[0]}, which doge did not write there; move it out "
                        "(doge replaces only what it created)")
    shutil.rmtree(path)


def verify(path: Path, state: dict[str, Any]) -> None:
    """Every file the checkpoint's state.json lists has its recorded size and checksum; a DogeError names the
    first that does not (checkpoints from before the list was kept are not verified)."""
    import xxhash

    files = state.get("files")
    if not isinstance(files, dict):
        return
    for name, want in files.items():
        file = Path(path) / name
        if not file.is_file():
            raise DogeError(f"checkpoint {path} lacks {name}")
        if file.stat().st_size != want.get("bytes"):
            raise DogeError(f"checkpoint {path}: {name} has {file.stat().st_size:,} bytes, not the {want.get('bytes'):,} "
                            "written; it is truncated or damaged")
        digest = xxhash.xxh3_128()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != want.get("xxh3"):
            raise DogeError(f"checkpoint {path}: {name} does not match the checksum recorded when it was written; "
                            "it is damaged")


# ------------------------------------------------------------------------------------------ read


def read_state(path: Path) -> dict[str, Any]:
    """The state.json of a checkpoint, checked; a DogeError names what is wrong with it."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DogeError(f"checkpoint {path} has no {STATE_FILE} (an incomplete checkpoint)") from None
    except (OSError, ValueError) as err:
        raise DogeError(f"checkpoint {path}: {STATE_FILE} is unreadable ({type(err).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DogeError(f"checkpoint {path}: {STATE_FILE} has no step number; it is damaged")
    return state


def _torch_file(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DogeError(f"checkpoint {path.parent} lacks {path.name} ({what})") from None
    except Exception as err:  # torch.load raises many types for a damaged or foreign file
        raise DogeError(f"checkpoint {path.parent}: {path.name} ({what}) is damaged or not doge's "
                        f"({type(err).__name__})") from None


def read_pieces(path: Path) -> dict[str, Any]:
    """Read and check everything of a checkpoint that is not applied collectively.

    Returns ``state``, ``config_yaml``, ``ranks`` (every process's rank file) and, for a checkpoint
    one process wrote whole, ``model`` and ``optimizer``. Raises DogeError naming the broken piece.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    verify(path, state)
    try:
        config_yaml = (path / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise DogeError(f"checkpoint {path} lacks a readable config.yaml") from None
    saved_world = int(state.get("world_size", 1))
    ranks = []
    for r in range(saved_world):
        if r == 0 and not (path / rank_file(0)).is_file() and (path / "rng.pt").is_file():
            ranks.append({"rng": _torch_file(path / "rng.pt", "RNG state")})  # written before per-process files
        else:
            ranks.append(_torch_file(path / rank_file(r), "RNG state and logging window"))
    out = {"state": state, "config_yaml": config_yaml, "ranks": ranks}
    if not state.get("accelerate_state") and not state.get("sharded"):
        try:
            out["model"] = load_file(str(path / WEIGHTS))
        except FileNotFoundError:
            raise DogeError(f"checkpoint {path} lacks {WEIGHTS} (the weights)") from None
        except (SafetensorError, OSError, ValueError) as err:
            raise DogeError(f"checkpoint {path}: {WEIGHTS} (the weights) is truncated or damaged ({err})") from None
        out["optimizer"] = _torch_file(path / OPTIMIZER, "optimizer state")
    return out


def pick_resume(run_dir: Path, resume: str, *, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its checked pieces, or None when ``--resume auto`` finds none.

    ``resume="auto"``: the newest checkpoint that reads completely; a broken newer one is named in
    the log and passed over. Any other value is a checkpoint folder, which must read completely.
    """
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise DogeError(f"{path} is not a complete checkpoint folder (expected RUN/checkpoints/step-NNNNNN "
                            f"with a {STATE_FILE}); or pass --resume auto to use the newest complete one")
        return path, read_pieces(path)
    candidates = list(reversed(list_checkpoints(run_dir)))
    problems = []
    for path in candidates:
        try:
            pieces = read_pieces(path)
        except DogeError as err:
            problems.append(str(err))
            log(f"passing over {path.name}: {err}")
            continue
        return path, pieces
    if problems:
        raise DogeError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be resumed ({problems[0]}); "
                        "pass --overwrite to start the run again")
    return None


def load(acc, path: Path, pieces: dict[str, Any], *, model, optimizer) -> dict[str, Any]:
    """Apply a checkpoint read by :func:`read_pieces`; returns this process's rank state (window)."""
    state = pieces["state"]
    if state.get("accelerate_state") or state.get("sharded"):
        try:
            acc.load_state(str(path))
        except Exception as err:  # accelerate/DeepSpeed raise many types for missing or damaged shards
            raise DogeError(f"checkpoint {path}: its sharded weights or optimizer state cannot be loaded "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})") from None
    else:
        unwrapped = acc.unwrap_model(model)
        load_weights_strictly(unwrapped, pieces["model"], where=f"checkpoint {path}")
        try:
            optimizer.load_state_dict(pieces["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise DogeError(f"checkpoint {path}: optimizer.pt does not match this model's parameters ({err}); "
                            "resume with the config it was written with") from None
    ranks = pieces["ranks"]
    rank = acc.process_index
    mine = ranks[rank] if rank < len(ranks) else None
    if len(ranks) != acc.num_processes and acc.is_main_process:
        print(f"checkpoint {path.name} was written by {len(ranks)} process(es) and resumes on {acc.num_processes}: "
              "RNG states are carried over where a process has one; losses logged at the next step may differ "
              "in the last digits", flush=True)
    set_rng_state((mine or ranks[0])["rng"])
    if len(ranks) == acc.num_processes:
        return mine.get("window") or {}
    # Another process count: the main process carries every process's unlogged sums.
    if not acc.is_main_process:
        return {}
    windows = [r.get("window") or {} for r in ranks]
    return merge_windows(windows)


def merge_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum logging windows of several processes into one."""
    out: dict[str, Any] = {}
    for w in windows:
        for key, value in w.items():
            if isinstance(value, dict):
                sub = out.setdefault(key, {})
                for k, v in value.items():
                    sub[k] = sub.get(k, 0) + v
            else:
                out[key] = out.get(key, 0) + value
    return out


def load_weights_strictly(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, where: str) -> None:
    """``load_state_dict`` that accepts nothing missing or unexpected (a tied head may be absent)."""
    tied = {"lm_head.weight"} if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()
    expected = set(model.state_dict())
    missing = expected - set(weights) - tied
    unexpected = set(weights) - expected
    if missing or unexpected:
        raise DogeError(f"{where} does not match the model (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}); resume or export with the config it was written with")
    try:  # everything was checked above; strict=False only lets a tied head be absent
        model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes
        raise DogeError(f"{where} does not fit the model: {str(err).splitlines()[-1].strip()}") from None
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
