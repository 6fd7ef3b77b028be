"""Metrics: metrics.jsonl always, a console line (rich on a terminal), TensorBoard, wandb and trackio on request,
and a loss-curve PNG at the end of a run. Only the main process writes."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from doge_cli.io import atomic_file, write_text_atomic

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, for MFU. Sources: vendor data sheets.
GPU_PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "4090": 165e12,
    "l40s": 362e12,
    "a10": 125e12,
}


def peak_flops(device_type: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was obtained). CPU peaks are measured with a short matmul probe."""
    import torch

    if device_type == "cuda":
        name = torch.cuda.get_device_name(0).lower()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return (value if precision != "fp32" else value / 2), f"data sheet ({name})"
        return None, f"unknown GPU {name}"
    if device_type == "cpu":
        # A large square matmul, best of several: small ones under-state the peak (and so
        # over-state MFU), and the best run filters out stalls from other processes.
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        n = 2048
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        best = math.inf
        for _ in range(4):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best, f"measured {dtype} {n}^3 matmul on {torch.get_num_threads()} threads"
    return None, "unknown device"


def peak_memory_gb(device_type: str) -> float:
    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int, resume_step: int = 0,
                 wandb: dict[str, Any] | None = None, trackio: dict[str, Any] | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._trackio = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from doge_cli.errors import DogeError

                raise DogeError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb is not None:  # {"project": ..., "config": ...} (doge_cli.train.trackers)
            from doge_cli.train.trackers import WandbTracker

            self._wandb = WandbTracker(self.run_dir, resume_step=resume_step, **wandb)
        if trackio is not None:
            from doge_cli.train.trackers import TrackioTracker

            self._trackio = TrackioTracker(self.run_dir, resume_step=resume_step, **trackio)
        if sys.stdout.isatty() and os.environ.get("DOGE_PLAIN_LOGS") != "1":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[line]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=resume_step, line="")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads like one straight run."""
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)
        if self._trackio is not None:
            self._trackio.log(record)
        line = format_line(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], line=line)
        else:
            print(f"step {record['step']}/{self.total_steps} {line}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._trackio is not None:
            self._trackio.close()
            self._trackio = None


def format_line(record: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("eval_ppl", "{:.2f}"), ("lr", "{:.2e}"),
                     ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.2%}"), ("mem_gb", "{:.2f}")):
        if key in record and record[key] is not None:
            parts.append(f"{key} " + fmt.format(record[key]))
    # The stage-specific figures worth a glance on the console (all of them are in metrics.jsonl).
    for key in ("rewards/accuracies", "rewards/margins", "reward", "kl", "clip_ratio", "completions/mean_length"):
        if isinstance(record.get(key), float):
            parts.append(f"{key} {record[key]:.4g}")
    return " ".join(parts)


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Training (and evaluation) loss against step, written atomically; None when nothing was logged."""
    if not metrics_path.exists():
        return None
    records = [json.loads(ln) for ln in metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png
