"""The one training loop every stage runs on.

accelerate owns devices, mixed precision and distribution (DDP, DeepSpeed ZeRO, FSDP); this
module owns what makes runs correct and repeatable:

- **Loss normalisation.** An objective returns loss *sums*; each optimizer step divides by the
  number of targets in all its micro-batches on all processes, so batch 1 × 8 accumulation gives
  the gradient of batch 8 × 1.
- **Data order** is a pure function of (seed, step): sequence ``i`` of the stream is
  ``perm(seed, epoch)[i mod n]``. A resumed run needs only the step to continue exactly.
- **Checkpoints** (see :mod:`doge_cli.train.checkpoint`) are atomic; ``resume="auto"`` continues
  from the newest complete one with the same weights, optimizer, schedule, RNG and data position.
- **No host/device synchronisation per step** except on logging steps (loss, grad norm and
  finiteness are kept as device tensors until then).

Reading order: :func:`train` → :func:`_prepare_run_dir` → :class:`Loop`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from doge_cli.config.loader import gradient_accumulation_steps, to_yaml
from doge_cli.config.schema import StageConfig
from doge_cli.errors import DogeError
from doge_cli.train import checkpoint as ckpt
from doge_cli.train.allocator import keep_large_allocations
from doge_cli.train.metrics import MetricsLogger, peak_flops, peak_memory_gb, plot_loss_curve
from doge_cli.train.objectives.base import Objective
from doge_cli.train.schedules import lr_multiplier

RUN_MARKER = "doge_run.json"
# Sections whose change makes a checkpoint's continuation a different run.
RESUME_SENSITIVE = ("stage", "model", "data", "optim", "schedule", "train", "init_from", "dpo", "grpo",
                    "assistant_only_loss", "packing")


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    last_loss: float | None
    eval_loss: float | None


def train(config: StageConfig, objective: Objective, *, resume: str | None = None, overwrite: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Run ``objective`` under ``config``. ``stop_after`` ends early after that many optimizer
    steps (tests use it to simulate an interruption); the schedule still spans the full run."""
    from accelerate import Accelerator, PartialState

    device_cpu = config.runtime.device == "cpu" or (config.runtime.device == "auto" and not torch.cuda.is_available())
    state_kwargs: dict[str, Any] = {"cpu": device_cpu}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and device_cpu:
        # accelerate ignores DeepSpeed when told cpu=True, and without CUDA it finds no backend:
        # name gloo so DeepSpeed's CPU accelerator gets a real process group.
        state_kwargs = {"cpu": False, "backend": "gloo"}
        device_cpu = False
    state = PartialState(**state_kwargs)
    if state.device.type == "cpu":
        keep_large_allocations()  # reuse the step's large tensors instead of page-faulting them anew
    world = state.num_processes
    accum = gradient_accumulation_steps(config, world)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.runtime.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=device_cpu, gradient_accumulation_steps=accum,
                              step_scheduler_with_optimizer=False)
    run_dir = Path(config.output_dir)
    resume_from = _prepare_run_dir(run_dir, config, resume=resume, overwrite=overwrite,
                                   main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
    return Loop(config, objective, accelerator, run_dir, accum, resume_from).run(stop_after)


def _prepare_run_dir(run_dir: Path, config: StageConfig, *, resume: str | None, overwrite: bool,
                     main: bool, barrier=lambda: None) -> Path | None:
    """Check the output folder and pick the checkpoint to resume from (None: fresh start).

    Every process checks before any process writes (``barrier`` between), so the main process
    creating the run marker cannot make the other processes see an "existing run".
    """
    is_run = (run_dir / RUN_MARKER).is_file()
    non_empty = run_dir.exists() and run_dir.is_dir() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise DogeError(f"output_dir {run_dir} is a file; choose a folder path")
    if resume and overwrite:
        raise DogeError("--resume and --overwrite contradict each other; pass one of them")
    found, wipe = None, False
    if resume:
        if resume == "auto":
            if non_empty and not is_run:
                raise DogeError(f"{run_dir} holds something other than a doge run; cannot resume from it")
            found = ckpt.latest_checkpoint(run_dir) if is_run else None
        else:
            found = Path(resume)
            if not (found / ckpt.STATE_FILE).is_file():
                raise DogeError(f"{found} is not a complete checkpoint folder (expected RUN/checkpoints/step-NNNNNN)")
        if found is not None:
            _check_resume_config(found, config)
        elif main:
            print(f"no checkpoint in {run_dir}; starting from scratch", flush=True)
    elif non_empty:
        if not overwrite:
            what = "an earlier doge run" if is_run else "files that are not a doge run"
            raise DogeError(f"output_dir {run_dir} already holds {what}; pass --resume auto to continue it, "
                            "--overwrite to replace it, or choose another output_dir")
        wipe = True
    barrier()
    if main:
        if wipe:
            shutil.rmtree(run_dir)
        _write_marker(run_dir, config)
    barrier()
    return found


def _write_marker(run_dir: Path, config: StageConfig) -> None:
    from doge_cli import __version__
    from doge_cli.io import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RUN_MARKER, json.dumps({"stage": config.stage, "doge_version": __version__}))
    write_text_atomic(run_dir / "config.yaml", to_yaml(config))


def _check_resume_config(path: Path, config: StageConfig) -> None:
    import yaml

    saved_text = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").exists() else ""
    saved = yaml.safe_load(saved_text) or {}
    now = yaml.safe_load(to_yaml(config))
    diffs = []
    for key in RESUME_SENSITIVE:
        diffs += _diff(saved.get(key), now.get(key), key)
    if diffs:
        shown = ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
        raise DogeError(f"cannot resume from {path}: the config changed ({shown}); restore those settings, "
                        "or pass --overwrite to start a new run")


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: never on norms, biases, residual weights or ``A``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(".A") or "residual" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _launcher_name(accelerator) -> str:
    kind = accelerator.distributed_type.value.lower()
    return "one process" if kind == "no" else kind.replace("multi_", "ddp/")


def data_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` training rows (a pure function)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Loop:
    def __init__(self, config: StageConfig, objective: Objective, accelerator, run_dir: Path, accum: int,
                 resume_from: Path | None):
        self.config = config
        self.obj = objective
        self.acc = accelerator
        self.run_dir = run_dir
        self.accum = accum
        self.resume_from = resume_from
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.micro = config.runtime.micro_batch_size

    # -- data order -------------------------------------------------------------------------
    def _indices(self, step: int, micro_index: int, split_len: int) -> list[int]:
        """Rows of micro-batch ``micro_index`` of optimizer ``step`` on this process."""
        per_step = self.micro * self.accum * self.world
        start = step * per_step + (micro_index * self.world + self.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, split_len)
            out.append(int(self._perm(epoch, split_len)[offset]))
        return out

    def _perm(self, epoch: int, n: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            self._perm_cache = (epoch, data_order(self.config.train.seed, epoch, n))
        return self._perm_cache[1]

    def _batch(self, step: int, micro_index: int) -> dict[str, torch.Tensor]:
        data = self.obj.train_data
        indices = self._indices(step, micro_index, len(data))
        rows = data[indices]
        rows = [{**dict(zip(rows, vals)), "_row": i} for vals, i in zip(zip(*rows.values()), indices)]
        return self.obj.collate(rows)

    # -- the run ------------------------------------------------------------------------------
    def run(self, stop_after: int | None) -> TrainResult:
        cfg, acc = self.config, self.acc
        torch.manual_seed(cfg.train.seed)
        import random

        random.seed(cfg.train.seed)
        self.obj.setup()
        model = self.obj.build_model()
        if cfg.runtime.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        fused = cfg.optim.fused if cfg.optim.fused is not None else acc.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            _decay_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps, fused=fused,
        )
        self._configure_deepspeed()
        model, optimizer = acc.prepare(model, optimizer)
        if cfg.runtime.compile:
            model = torch.compile(model)
        self.obj.after_prepare(model, acc)

        n_train = len(self.obj.train_data)
        per_step = cfg.train.global_batch_size
        total = cfg.train.max_steps or max(1, math.ceil(cfg.train.num_epochs * n_train / per_step))
        start_step, history = 0, {}
        if self.resume_from is not None:
            start_step, history = self._restore(model, optimizer)
        logger = MetricsLogger(self.run_dir, enabled=acc.is_main_process, tensorboard=cfg.logging.tensorboard,
                               total_steps=total, resume_step=start_step)
        logger.message(
            f"{cfg.stage}: {total} optimizer steps x {cfg.train.global_batch_size} sequences "
            f"(micro batch {self.micro} x accumulation {self.accum} x {self.world} process"
            f"{'es' if self.world > 1 else ''}), {_launcher_name(acc)} on {acc.device}, "
            f"{cfg.runtime.precision}, attention {getattr(acc.unwrap_model(model), 'attn_implementation', '?')}"
        )
        if self.resume_from is not None:
            logger.message(f"resumed from {self.resume_from} at step {start_step}")
        flops_per_target = self.obj.flops_per_target()
        peak, _ = peak_flops(acc.device.type, cfg.runtime.precision) if flops_per_target else (None, "")

        last_loss = history.get("last_loss")
        eval_loss = history.get("eval_loss")
        window = self._new_window()
        grad_norm = torch.zeros((), device=acc.device)
        finite = torch.ones((), dtype=torch.bool, device=acc.device)
        step = start_step
        end = total if stop_after is None else min(total, start_step + stop_after)
        model.train()
        try:
            while step < end:
                mult = lr_multiplier(step, total, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr * mult
                batches = [self._batch(step, m) for m in range(self.accum)]
                self.obj.step = step
                batches = self.obj.prepare_step(model, batches)
                local = sum(self.obj.count_targets(b) for b in batches)
                n_global = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum").clamp(min=1.0)
                for batch in batches:
                    batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    with acc.accumulate(model), acc.autocast():
                        out = self.obj.loss(model, batch)
                        # accelerate divides by the accumulation steps and DDP averages over
                        # processes; undo both so the step's gradient is sum / all targets.
                        acc.backward(out.loss_sum * (self.world * self.accum) / n_global)
                        if acc.sync_gradients:
                            max_norm = cfg.optim.max_grad_norm or float("inf")
                            grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    window["loss"] += out.loss_sum.detach().float()
                    finite &= torch.isfinite(out.loss_sum.detach())
                    for key, value in out.metrics.items():
                        window["metrics"][key] = window["metrics"].get(key, 0.0) + value.detach().float()
                    for key, value in out.stats.items():
                        window["stats"][key] = window["stats"].get(key, 0.0) + value.detach().float()
                    window["micro_batches"] += 1
                    window["tokens"] += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
                window["targets"] += local
                window["steps"] += 1
                step += 1

                is_last = step == end
                if step % cfg.logging.log_every == 0 or is_last:
                    record = self._log_record(step, mult, window, grad_norm, flops_per_target, peak)
                    if not math.isfinite(record["loss"]) or self._any_nonfinite(finite):
                        raise DogeError(self._divergence_message(step))
                    last_loss = record["loss"]
                    window = self._new_window()
                    if (cfg.logging.eval_every and step % cfg.logging.eval_every == 0) or step == total:
                        eval_loss = self.evaluate(model)
                        if eval_loss is not None:
                            record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                    logger.log(record)
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (is_last and step < total):
                    if self._any_nonfinite(finite):
                        raise DogeError(self._divergence_message(step))
                    self._save(model, optimizer, step, {"last_loss": last_loss, "eval_loss": eval_loss})
        finally:
            logger.close()
        final_dir = None
        if step == total:
            final_dir = self._export(model)
            if acc.is_main_process:
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
        acc.wait_for_everyone()
        return TrainResult(self.run_dir, final_dir, step, last_loss, eval_loss)

    # -- pieces ---------------------------------------------------------------------------------
    def _configure_deepspeed(self) -> None:
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is not None:
            # No dataloader goes through accelerate, so tell DeepSpeed the micro batch ourselves.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro
            plugin.deepspeed_config["gradient_accumulation_steps"] = self.accum
            plugin.deepspeed_config.setdefault("gradient_clipping", self.config.optim.max_grad_norm or 1e9)

    def _new_window(self) -> dict[str, Any]:
        return {"loss": torch.zeros((), device=self.acc.device), "targets": 0, "tokens": 0, "steps": 0,
                "metrics": {}, "stats": {}, "micro_batches": 0, "t0": time.perf_counter()}

    def _log_record(self, step, mult, window, grad_norm, flops_per_target, peak) -> dict[str, Any]:
        acc = self.acc
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        loss_sum = acc.reduce(window["loss"].clone(), reduction="sum")
        targets = acc.reduce(torch.tensor(float(window["targets"]), device=acc.device), reduction="sum")
        tokens = window["tokens"] * self.world
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss_sum / targets.clamp(min=1)),
            "lr": self.config.optim.lr * mult,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / elapsed,
            "mem_gb": peak_memory_gb(acc.device.type),
        }
        if flops_per_target and peak:
            record["mfu"] = flops_per_target * tokens / elapsed / (peak * self.world)
        for key, value in window["metrics"].items():
            record[key] = float(acc.reduce(value.clone(), reduction="sum") / targets.clamp(min=1))
        for key, value in window["stats"].items():
            record[key] = float(acc.reduce(value.clone(), reduction="sum")) / max(window["micro_batches"] * self.world, 1)
        return record

    def _any_nonfinite(self, finite: torch.Tensor) -> bool:
        return bool(self.acc.reduce((~finite).float(), reduction="sum") > 0)

    def _divergence_message(self, step: int) -> str:
        last = ckpt.latest_checkpoint(self.run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        return (f"the loss became NaN or infinite by step {step}; {keep}. Lower optim.lr, raise "
                "optim.warmup, or use runtime.precision=fp32, then resume with --resume auto")

    @torch.no_grad()
    def evaluate(self, model) -> float | None:
        data = self.obj.eval_data
        if data is None or len(data) == 0:
            return None
        model.eval()
        total = torch.zeros((), device=self.acc.device)
        targets = 0
        n = min(len(data), self.config.logging.eval_batches * self.micro)  # same rows whatever the world size
        for start in range(self.rank * self.micro, n, self.micro * self.world):
            rows = data[start:min(start + self.micro, n)]
            rows = [{**dict(zip(rows, vals)), "_row": start + j} for j, vals in enumerate(zip(*rows.values()))]
            batch = {k: (v.to(self.acc.device) if isinstance(v, torch.Tensor) else v)
                     for k, v in self.obj.collate(rows).items()}
            with self.acc.autocast():
                out = self.obj.eval_loss(model, batch)
            total += out.loss_sum.float()
            targets += self.obj.count_targets(batch)
        model.train()
        total = self.acc.reduce(total, reduction="sum")
        count = self.acc.reduce(torch.tensor(float(targets), device=self.acc.device), reduction="sum")
        return float(total / count.clamp(min=1))

    def _uses_sharded_state(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def _save(self, model, optimizer, step: int, history: dict[str, Any]) -> None:
        acc = self.acc
        state = {"step": step, "data_position": step * self.config.train.global_batch_size, **history}
        if self._uses_sharded_state():
            # DeepSpeed/FSDP shard optimizer state across processes: accelerate knows the layout.
            root = self.run_dir / "checkpoints"
            tmp = root / f".tmp-{ckpt.step_dir_name(step)}"
            if acc.is_main_process:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                (tmp / "config.yaml").write_text(to_yaml(self.config), encoding="utf-8")
                (tmp / ckpt.STATE_FILE).write_text(json.dumps({**state, "accelerate_state": True}), encoding="utf-8")
                final = root / ckpt.step_dir_name(step)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                for old in ckpt.list_checkpoints(self.run_dir)[:-self.config.checkpoint.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
            return
        if acc.is_main_process:
            ckpt.save_checkpoint(
                self.run_dir, step, model_state=acc.unwrap_model(model).state_dict(),
                optimizer_state=optimizer.state_dict(), state=state, config_yaml=to_yaml(self.config),
                keep_last=self.config.checkpoint.keep_last,
            )
        acc.wait_for_everyone()

    def _restore(self, model, optimizer) -> tuple[int, dict[str, Any]]:
        path = self.resume_from
        state = json.loads((path / ckpt.STATE_FILE).read_text(encoding="utf-8"))
        if state.get("accelerate_state"):
            self.acc.load_state(str(path))
        else:
            loaded = ckpt.load_checkpoint(path)
            unwrapped = self.acc.unwrap_model(model)
            missing, unexpected = unwrapped.load_state_dict(loaded["model"], strict=False)
            tied = {"lm_head.weight"} if getattr(unwrapped.config, "tie_word_embeddings", False) else set()
            if set(missing) - tied or unexpected:
                raise DogeError(f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]}); resume with the config it was written with")
            optimizer.load_state_dict(loaded["optimizer"])
            ckpt.set_rng_state(loaded["rng"])
        return int(state["step"]), state

    def _export(self, model) -> Path | None:
        """Write RUN/final as a Hugging Face model folder (full weights gathered under ZeRO-3/FSDP)."""
        from doge_cli.model import DogeForCausalLM, save_pretrained

        acc = self.acc
        full_state = acc.get_state_dict(model)
        final = self.run_dir / "final"
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(model)
            export = DogeForCausalLM(unwrapped.config, attn_implementation="eager")
            export.load_state_dict({k: v.detach().float().cpu() for k, v in full_state.items()}, strict=False)
            if export.config.tie_word_embeddings:
                export.lm_head.weight = export.model.embed_tokens.weight
            save_pretrained(export, final, tokenizer=self.obj.tokenizer)
        acc.wait_for_everyone()
        return final
