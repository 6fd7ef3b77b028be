"""The one training loop every stage runs on.

accelerate owns devices, mixed precision and distribution (DDP, DeepSpeed ZeRO, FSDP); this
module owns what makes runs correct and repeatable:

- **Loss normalisation.** An objective returns loss *sums*; each optimizer step divides by the
  number of targets in all its micro-batches on all processes, so batch 1 × 8 accumulation gives
  the gradient of batch 8 × 1.
- **Data order** is a pure function of (seed, data step): sequence ``i`` of the stream is
  ``perm(seed, epoch)[i mod n]``. A resumed run needs only the step to continue exactly. An
  objective that trains several optimizer steps on one batch (GRPO's ``num_iterations``) advances
  the data once per batch, so every row of an epoch is used.
- **Checkpoints** (:mod:`doge_cli.train.checkpoint`) are atomic and carry each process's RNG and
  unlogged metric sums: ``resume="auto"`` continues from the newest complete checkpoint and logs and
  trains exactly what an uninterrupted run does, whatever ``checkpoint.every`` and ``log_every`` are.
- **Nothing is written before training can start**: the run folder is checked first, then data,
  tokenizer, model, attention backend and the checkpoint to resume are loaded, and only then is the
  run folder created (or an earlier run replaced, with ``--overwrite``). A folder that is not a doge
  run is never replaced.
- **No host/device synchronisation per step** except on logging steps (loss, grad norm and
  finiteness are kept as device tensors until then).

Reading order: :func:`train` → :meth:`Loop.load` → :meth:`Loop.check_eval_tasks` → :meth:`Loop.prepare`
→ :meth:`Loop.restore` → :meth:`Loop.open_run_dir` → :meth:`Loop.run` (:meth:`Loop.train_step`,
:meth:`Loop.after_step`) → :meth:`Loop.finish`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from doge_cli.config import presets
from doge_cli.config.loader import gradient_accumulation_steps, to_yaml
from doge_cli.config.schema import StageConfig
from doge_cli.errors import DogeError
from doge_cli.io import write_text_atomic
from doge_cli.train import checkpoint as ckpt
from doge_cli.train import eval_tasks, trackers
from doge_cli.train.allocator import keep_large_allocations
from doge_cli.train.collective import gathers_weights_in_forward, stop_together
from doge_cli.train.metrics import MetricsLogger, peak_flops, peak_memory_gb, plot_loss_curve
from doge_cli.train.objectives.base import Objective
from doge_cli.train.optim import build_optimizer, describe_optimizer
from doge_cli.train.schedules import lr_multiplier

RUN_MARKER = "doge_run.json"
# Settings that may change when a run is resumed; every other one must equal the checkpoint's.
RESUME_FREE = ("runtime", "logging", "checkpoint", "hub", "output_dir", "hardware", "size")
SAMPLE_TOKENS = 48  # new tokens of a periodic sample (logging.sample_every)


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
    steps (tests use it to simulate an interruption); the schedule still spans the full run.

    In a distributed run (one machine or several) the processes take every start-up decision together
    (:func:`doge_cli.train.collective.agree`): a check that fails on one process stops all of them with
    one line naming it; the run folder is checked and chosen by the main process alone; every process
    must run the same settings and, across machines, see the same run folder and inputs. A process lost
    later (killed, crashed, hung past ``runtime.dist_timeout``) stops the others with one line
    (:class:`~doge_cli.errors.PeerLost`, exit code 1)."""
    from datetime import timedelta

    from accelerate import Accelerator, PartialState

    from doge_cli.errors import PeerLost
    from doge_cli.io import check_apart
    from doge_cli.train.collective import agree, check_same_run, peer_failure

    run_dir = Path(config.output_dir)
    device_cpu = config.runtime.device == "cpu" or (config.runtime.device == "auto" and not torch.cuda.is_available())
    state_kwargs: dict[str, Any] = {"cpu": device_cpu}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and device_cpu:
        # accelerate ignores DeepSpeed when told cpu=True, and without CUDA it finds no backend:
        # name gloo so DeepSpeed's CPU accelerator gets a real process group.
        state_kwargs = {"cpu": False, "backend": "gloo"}
        device_cpu = False
    # The process group's timeout bounds every collective wait (gloo raises; NCCL's watchdog ends the process).
    state = PartialState(**state_kwargs, timeout=timedelta(seconds=config.runtime.dist_timeout))
    loop: Loop | None = None
    try:
        def checks():
            check_apart(run_dir, {"start model (init_from)": getattr(config, "init_from", None),
                                  "dataset (data.path)": config.data.path,
                                  "tokenizer (data.tokenizer)": config.data.tokenizer}, "output_dir")
            try:
                return presets.check_hardware(config.hardware, config.runtime.device)
            except ValueError as err:
                raise DogeError(str(err)) from None

        hardware_note = agree(state, checks)
        replace = agree(state, lambda: check_run_dir(run_dir, resume=resume, overwrite=overwrite), main_only=True)
        check_same_run(state, run_dir, {"data.path": config.data.path, "data.tokenizer": config.data.tokenizer,
                                        "init_from": getattr(config, "init_from", None)},
                       settings=to_yaml(config.model_copy(update={"output_dir": ""})) + f"{resume}|{overwrite}")
        if state.device.type == "cpu":
            keep_large_allocations()  # reuse the step's large tensors instead of page-faulting them anew
        accum = gradient_accumulation_steps(config, state.num_processes)
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.runtime.precision]
        accelerator = Accelerator(mixed_precision=mixed, cpu=device_cpu, gradient_accumulation_steps=accum,
                                  step_scheduler_with_optimizer=False)
        loop = Loop(config, objective, accelerator, run_dir, accum)
        if hardware_note is not None:
            loop.notes.append(hardware_note)
        agree(state, loop.load)
        agree(state, loop.check_eval_tasks)
        loop.prepare()
        loop.restore(resume)
        loop.open_run_dir(replace=replace)
        return loop.run(stop_after)
    except DogeError:
        _leave_process_group(state)  # agreed by every process: leave the group in order, not in its destructor
        raise
    except RuntimeError as err:
        reason = peer_failure(err) if state.num_processes > 1 else None
        if reason is None:
            raise
        _leave_process_group(state)
        at = f" at step {loop.current_step}" if loop is not None and loop.current_step else " before training started"
        raise PeerLost(f"this run lost one of its {state.num_processes} processes{at} ({reason}): a process or its "
                       "machine stopped, or hung past runtime.dist_timeout; each machine's own log says which. "
                       "Continue with --resume auto on every machine") from None


def _leave_process_group(state) -> None:
    """Destroy the process group before a distributed run ends with an error: left to the interpreter's exit,
    gloo's destructor can abort the process (SIGABRT) when a peer has gone first, losing the exit code."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_run_dir(run_dir: Path, *, resume: str | None, overwrite: bool) -> bool:
    """Check the output folder before anything is loaded or written; True when ``--overwrite`` is
    to replace an earlier doge run there. A folder that is not a doge run is never replaced."""
    if resume and overwrite:
        raise DogeError("--resume and --overwrite contradict each other; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise DogeError(f"output_dir {run_dir} is a file; choose a folder path")
    is_run = (run_dir / RUN_MARKER).is_file()
    non_empty = run_dir.is_dir() and any(run_dir.iterdir())
    if non_empty and not is_run:
        raise DogeError(f"output_dir {run_dir} holds files that are not a doge run, and doge never replaces "
                        "them; choose another output_dir")
    if is_run and not resume and not overwrite:
        raise DogeError(f"output_dir {run_dir} already holds a doge run; pass --resume auto to continue it, "
                        "--overwrite to replace it, or choose another output_dir")
    if is_run and overwrite:
        foreign = foreign_run_files(run_dir)
        if foreign:
            raise DogeError(f"output_dir {run_dir} holds {foreign[0]}, which doge did not write there, so --overwrite "
                            "would lose it; move it out or choose another output_dir")
    return is_run and overwrite


# What a run folder holds: doge's files, the trackers' folders (written by their libraries) and state, GRPO's
# stored rollouts, and checkpoints.
RUN_FILES = {RUN_MARKER, "config.yaml", "metrics.jsonl", "loss_curve.png", "final", "checkpoints", "tensorboard",
             "wandb", "wandb_run.json", "trackio_run.json", "rollouts"}


def foreign_run_files(run_dir: Path) -> list[str]:
    """Files in a run folder that doge did not write: anything beside its own entries, in ``final/`` beyond
    what its marker lists, or in a checkpoint beyond what its state.json lists."""
    from doge_cli.io import foreign_files

    out = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
    final = run_dir / "final"
    if final.is_dir():
        out += [f"final/{name}" for name in foreign_files(final)]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if not (entry.is_dir() and re.fullmatch(r"\.?(tmp-)?step-\d+", entry.name)):
                out.append(f"checkpoints/{entry.name}")
            else:
                out += [f"checkpoints/{entry.name}/{name}" for name in ckpt.foreign_in_checkpoint(entry)]
    return out


def _check_resume_config(path: Path, saved_text: str, config: StageConfig) -> None:
    import yaml

    try:
        saved = yaml.safe_load(saved_text) or {}
    except yaml.YAMLError:
        raise DogeError(f"checkpoint {path}: config.yaml is not valid YAML; it is damaged") from None
    now = yaml.safe_load(to_yaml(config))
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key not in RESUME_FREE:
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


def _launcher_name(accelerator) -> str:
    kind = accelerator.distributed_type.value.lower()
    return "one process" if kind == "no" else kind.replace("multi_", "ddp/")


def data_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` training rows (a pure function)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatches(torch.utils.data.Dataset):
    """Item ``i``: the collated micro-batches of optimizer step ``start + i`` on one process, a pure
    function of the step, so background workers build exactly what the loop would build itself."""

    def __init__(self, objective: Objective, *, micro: int, accum: int, world: int, rank: int, seed: int,
                 start: int, end: int):
        self.obj, self.micro, self.accum, self.world, self.rank, self.seed = objective, micro, accum, world, rank, seed
        self.start, self.end = start, end
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return self.for_step(self.start + i)

    def for_step(self, step: int) -> list[dict[str, Any]]:
        return [self.micro_batch(step, m) for m in range(self.accum)]

    def rows(self, step: int, micro_index: int, n: int) -> list[int]:
        """Rows of micro-batch ``micro_index`` of optimizer ``step`` on this process."""
        data_step = step // self.obj.steps_per_batch
        start = data_step * self.micro * self.accum * self.world + (micro_index * self.world + self.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, n)
            if self._perm_cache is None or self._perm_cache[0] != epoch:
                self._perm_cache = (epoch, data_order(self.seed, epoch, n))
            out.append(int(self._perm_cache[1][offset]))
        return out

    def micro_batch(self, step: int, micro_index: int) -> dict[str, Any]:
        data = self.obj.train_data
        indices = self.rows(step, micro_index, len(data))
        rows = data[indices]
        rows = [{**dict(zip(rows, vals)), "_row": i} for vals, i in zip(zip(*rows.values()), indices)]
        return self.obj.collate(rows)


class Loop:
    """One run: :meth:`load`, :meth:`prepare`, :meth:`restore`, :meth:`open_run_dir`, then :meth:`run`."""

    def __init__(self, config: StageConfig, objective: Objective, accelerator, run_dir: Path, accum: int):
        self.config = config
        self.obj = objective
        self.acc = accelerator
        self.run_dir = run_dir
        self.accum = accum
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.micro = config.runtime.micro_batch_size
        self.model = None  # the prepared model (DDP/DeepSpeed/FSDP wrapper), never a compile wrapper
        self.train_model = None  # what the forward passes go through: ``model``, or torch.compile of it
        self.module = None  # the bare DogeForCausalLM inside ``model`` (generation, export config)
        self.optimizer = None
        self.flops_per_target: float | None = None
        self.peak: float | None = None
        self.resume_from: Path | None = None
        self.start_step = 0
        self.current_step = 0  # the optimizer step being taken (for messages)
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.window = self._new_window()
        self.grad_norm = torch.zeros((), device=accelerator.device)
        self.finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        self.logger: MetricsLogger | None = None
        self.notes: list[str] = []  # said once at the start of the run (console and log): hardware, attention
        self.frozen_in_warmup: list[torch.nn.Parameter] = []  # what train.moe_warmup_steps keeps still
        self._logged_attention: str | None = None  # the backend named in metrics.jsonl so far
        self.task_eval: eval_tasks.TaskEvaluation | None = None  # logging.eval_tasks, checked by check_eval_tasks
        self._said: set[str] = set()  # messages of the in-training evaluation said so far (each is said once)

    def say(self, text: str) -> None:
        if self.acc.is_main_process:
            print(text, flush=True)

    # -- phases -------------------------------------------------------------------------------
    def load(self) -> None:
        """Data, tokenizer, model and optimizer on this process; writes nothing and talks to no other process,
        so a failure here is shared before the distribution wrappers start collective work."""
        from doge_cli.model.attention import check_backend_runs, resolve_backend

        cfg, acc = self.config, self.acc
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.obj.setup()
        model = self.obj.build_model()
        self._record_start_model(model)
        self._check_attention(model, check_backend_runs, resolve_backend)
        trackers.check(cfg.logging)
        self._setup_moe_warmup(model)
        if cfg.hub.push:
            from doge_cli.push import preflight

            preflight(cfg.hub.repo, what="hub.repo")  # offline, no token, a bad id: refused before training
        if cfg.runtime.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = build_optimizer(model, cfg.optim, device_type=acc.device.type,
                                    distributed_type=acc.distributed_type)
        # The schedule scales each group's own peak (AdamW's lr, Muon's muon_lr); kept here, since loading
        # an optimizer state replaces the groups' settings.
        self.peak_lrs = [group["peak_lr"] for group in optimizer.param_groups]
        self.notes.append(describe_optimizer(model, cfg.optim))
        self._loaded = model, optimizer
        self._configure_deepspeed()

    def check_eval_tasks(self) -> None:
        """``logging.eval_tasks``: everything its tasks need, checked with the run's tokenizer before anything
        is written (a missing datasets folder fails here, not at the first evaluation)."""
        self.task_eval = eval_tasks.prepare(self.config, self.obj.tokenizer)
        if self.task_eval is not None:
            self.notes.append(self.task_eval.describe())

    def prepare(self) -> None:
        """The distribution wrappers (DDP/DeepSpeed/FSDP) and the objective's reference models."""
        from doge_cli.train.objectives.lm import unwrap

        model, optimizer = self._loaded
        del self._loaded
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # Checkpoints and the export read self.model, so a compile wrapper never renames their weights.
        self.train_model = torch.compile(self.model) if self.config.runtime.compile else self.model
        self.obj.after_prepare(self.model, self.acc)
        self.module = unwrap(self.model)

    def restore(self, resume: str | None) -> None:
        """Load the checkpoint to continue from (``--resume``), falling back past broken ones for ``auto``.
        The main process chooses it; every process then reads it (and all stop if one cannot)."""
        from doge_cli.train.collective import agree

        if not resume:
            return
        state, chosen = self.acc.state, {}

        def choose() -> str | None:
            found = ckpt.pick_resume(self.run_dir, resume, log=self.say)
            if found is None:
                return None
            chosen["pieces"] = found[1]
            return str(found[0])

        where = agree(state, choose, main_only=True)
        if where is None:
            self.say(f"no checkpoint in {self.run_dir}; starting from scratch")
            return
        path = Path(where)

        def read() -> dict[str, Any]:
            pieces = chosen.get("pieces") or ckpt.read_pieces(path)
            _check_resume_config(path, pieces["config_yaml"], self.config)
            return pieces

        pieces = agree(state, read)
        window = ckpt.load(self.acc, path, pieces, model=self.model, optimizer=self.optimizer)
        state = pieces["state"]
        self.resume_from, self.start_step = path, int(state["step"])
        self.current_step = self.start_step
        self.last_loss, self.eval_loss = state.get("last_loss"), state.get("eval_loss")
        self.window = self._window_from(window)

    def open_run_dir(self, *, replace: bool) -> None:
        """Create the run folder (replacing an earlier doge run with ``--overwrite``): training starts."""
        from doge_cli import __version__

        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if replace:
                shutil.rmtree(self.run_dir)  # check_run_dir made sure it is a doge run with nothing else in it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from doge_cli.env_info import run_environment

            environment = run_environment(str(self.acc.device), self.world)
            write_text_atomic(self.run_dir / RUN_MARKER, json.dumps(
                {"stage": self.config.stage, "doge_version": __version__, "environment": environment}, indent=2))
            write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.config))
        self.acc.wait_for_everyone()

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.train.max_steps:
            return cfg.train.max_steps
        batches = max(1, math.ceil(cfg.train.num_epochs * len(self.obj.train_data) / cfg.train.global_batch_size))
        return batches * self.obj.steps_per_batch

    def _record_start_model(self, model) -> None:
        """With init_from the model's shape is the start model's, not the size preset's: the run's
        config.yaml (and ``doge report``) record what was loaded, e.g. an upcycled CDMoE model."""
        from doge_cli.config.schema import ModelConfig

        if getattr(self.config, "init_from", None):
            loaded = ModelConfig.from_hf(getattr(model, "config", None))
            if loaded is None:
                return
            planned = self.config.model
            if planned.is_moe and (planned.is_moe, planned.num_experts, planned.num_experts_per_tok) != \
                    (loaded.is_moe, loaded.num_experts, loaded.num_experts_per_tok):
                self.notes.append(f"the config plans a CDMoE model with {planned.num_experts} experts, top "
                                  f"{planned.num_experts_per_tok}, but {self.config.init_from} has "
                                  + (f"{loaded.num_experts}, top {loaded.num_experts_per_tok}" if loaded.is_moe
                                     else "no experts") + "; the loaded model trains (memory was planned for "
                                  "the config's)")
            self.config.model = loaded

    def _setup_moe_warmup(self, model) -> None:
        """train.moe_warmup_steps: check the model and the launcher allow it; note what stays frozen."""
        from doge_cli.model.upcycle import NEW_TENSORS

        cfg = self.config
        steps = cfg.train.moe_warmup_steps
        config = getattr(model, "config", None)
        if steps:
            if not getattr(config, "is_moe", False):
                raise DogeError("train.moe_warmup_steps needs a CDMoE model; make one from a dense model with "
                                "`doge upcycle MODEL --out DIR` and train from it (init_from=DIR)")
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or \
                    os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                raise DogeError("train.moe_warmup_steps works on one process or under DDP; DeepSpeed and FSDP "
                                "step inside their own engine, where the dense tensors cannot be held still")
            self.frozen_in_warmup = [p for name, p in model.named_parameters()
                                     if not name.endswith(NEW_TENSORS)]
            self.notes.append(f"MoE warm-up: steps 1-{steps} train only the router and expert embeddings, then "
                              "every tensor trains")
        init = getattr(cfg, "init_from", None)
        record = Path(str(init)) / "upcycling.json" if init else None
        if config is not None and getattr(config, "is_moe", False) and record is not None and record.is_file():
            self._check_continuation_lr(record)

    def _check_continuation_lr(self, record: Path) -> None:
        """Say when continuing an upcycled model at a learning rate far above the dense run's (small-doge
        issue #135: restarting MoE continuation at a high rate ended in a collapsed loss)."""
        import yaml

        source = Path(json.loads(record.read_text(encoding="utf-8")).get("upcycled_from", ""))
        dense_config = source.parent / "config.yaml" if source.name == "final" else None
        if dense_config is None or not dense_config.is_file():
            return
        dense_lr = ((yaml.safe_load(dense_config.read_text(encoding="utf-8")) or {}).get("optim") or {}).get("lr")
        if isinstance(dense_lr, (int, float)) and self.config.optim.lr > 2 * dense_lr:
            self.notes.append(f"optim.lr {self.config.optim.lr:g} is more than twice the dense run's {dense_lr:g}; "
                              "continuation training of an upcycled model usually uses at most the dense rate")

    def _check_attention(self, model, check_backend_runs, resolve_backend) -> None:
        """Refuse an attention backend that cannot run here before anything is written; on CUDA the
        Triton kernel is compiled and run once at the model's head dim and compute dtype, and when
        ``auto`` passes it over for that reason the run says so (log, console, metrics.jsonl)."""
        from doge_cli.kernels import unavailable_reason
        from doge_cli.model.modeling import head_dim

        device, requested = self.acc.device, getattr(model, "attn_requested", "auto")
        config = getattr(model, "config", None)
        dim = head_dim(config) if config is not None and hasattr(config, "num_attention_heads") else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.runtime.precision, torch.float32)
        resolved = resolve_backend(requested, device, dim, dtype)
        check_backend_runs(resolved, device, dim, dtype)
        if requested == "auto" and device.type == "cuda" and resolved != "triton":
            self.notes.append(f"attention auto: triton passed over on {device} ({unavailable_reason(device)}); using {resolved}")

    def run(self, stop_after: int | None) -> TrainResult:
        cfg, acc = self.config, self.acc
        total = self.total_steps()
        names = trackers.wanted(cfg.logging)
        settings = {"project": cfg.logging.project, "config": json.loads(cfg.model_dump_json())}
        self.logger = MetricsLogger(self.run_dir, enabled=acc.is_main_process, tensorboard="tensorboard" in names,
                                    total_steps=total, resume_step=self.start_step,
                                    wandb=settings if "wandb" in names else None,
                                    trackio=settings if "trackio" in names else None)
        self.logger.message(
            f"{cfg.stage}: {total} optimizer steps x {cfg.train.global_batch_size} sequences "
            f"(micro batch {self.micro} x accumulation {self.accum} x {self.world} process"
            f"{'es' if self.world > 1 else ''}), {_launcher_name(acc)} on {acc.device}, "
            f"{cfg.runtime.precision}, attention {getattr(self.module, 'attn_implementation', '?')}"
        )
        for note in self.notes:
            self.logger.message(note)
        if self.resume_from is not None:
            self.logger.message(f"resumed from {self.resume_from} at step {self.start_step}")
        self.flops_per_target = self.obj.flops_per_target()
        self.peak = peak_flops(acc.device.type, cfg.runtime.precision)[0] if self.flops_per_target else None
        step = self.start_step
        end = total if stop_after is None else min(total, self.start_step + stop_after)
        self.train_model.train()
        self.window["t0"] = time.perf_counter()
        try:
            for batches in self._step_batches(step, end):
                self.current_step = step + 1
                self.train_step(step, total, batches)
                step += 1
                self.after_step(step, total, end)
        finally:
            self.logger.close()
        return self.finish(step, total)

    def train_step(self, step: int, total: int, batches: list[dict[str, Any]]) -> None:
        """One optimizer step: its micro-batches' loss sums divided by the step's targets on all processes."""
        cfg, acc, window = self.config, self.acc, self.window
        mult = lr_multiplier(step, total, cfg.schedule)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * mult
        self.obj.step = step
        batches = self.obj.prepare_step(self.model, batches)
        local = sum(self.obj.count_targets(b) for b in batches)
        n_global = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum").clamp(min=1.0)
        for batch in batches:
            batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with acc.accumulate(self.train_model), acc.autocast():
                out = self.obj.loss(self.train_model, batch)
                # accelerate divides by the accumulation steps and DDP averages over
                # processes; undo both so the step's gradient is sum / all targets.
                acc.backward(out.loss_sum * (self.world * self.accum) / n_global)
                if acc.sync_gradients:
                    if step < cfg.train.moe_warmup_steps:  # router warm-up: the dense tensors do not move
                        for param in self.frozen_in_warmup:
                            param.grad = None  # AdamW skips them: no update, no decay, no state
                    # Under DeepSpeed the engine clipped and stepped inside backward (gradient_clipping is
                    # set from optim.max_grad_norm); this returns the norm of this very step.
                    max_norm = cfg.optim.max_grad_norm or float("inf")
                    norm = acc.clip_grad_norm_(self.train_model.parameters(), max_norm)
                    self.grad_norm = torch.as_tensor(norm if norm is not None else float("nan"),
                                                     device=acc.device, dtype=torch.float32)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window["loss"] += out.loss_sum.detach().float()
            self.finite &= torch.isfinite(out.loss_sum.detach())
            for key, value in out.metrics.items():
                window["metrics"][key] = window["metrics"].get(key, 0.0) + value.detach().float()
            for key, value in out.stats.items():
                window["stats"][key] = window["stats"].get(key, 0.0) + value.detach().float()
            window["micro_batches"] += 1
            window["tokens"] += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        window["targets"] += local
        window["steps"] += 1

    def after_step(self, step: int, total: int, end: int) -> None:
        """Log, evaluate, sample, check for divergence and checkpoint, as the config asks."""
        cfg = self.config.logging
        eval_due = bool((cfg.eval_every and step % cfg.eval_every == 0) or step == total)
        sample_due = bool(cfg.sample_every and step % cfg.sample_every == 0)
        tasks_due = self.task_eval is not None and self.task_eval.due(step, total)
        if step % cfg.log_every == 0 or step == total or eval_due or sample_due or tasks_due:
            record = self._log_record(step, total)
            attention = getattr(self.module, "attn_implementation", None)
            if attention != self._logged_attention:  # the first record, and any later change of backend
                record["attention"] = self._logged_attention = attention
            if not math.isfinite(record["loss"]) or self._any_nonfinite():
                raise DogeError(self._divergence_message(step))
            self.last_loss = record["loss"]
            self.window = self._new_window()
            paused = time.perf_counter()
            if eval_due:
                self.eval_loss = self.evaluate()
                if self.eval_loss is not None:
                    record.update(eval_loss=self.eval_loss, eval_ppl=math.exp(min(self.eval_loss, 50)))
            if sample_due:
                record["sample"] = self.sample()
            if tasks_due:
                record.update(self.evaluate_tasks(step))
            self.window["paused_s"] += time.perf_counter() - paused
            self.logger.log(record)
        every = self.config.checkpoint.every
        if (every and step % every == 0) or (step == end and step < total):
            if self._any_nonfinite():
                raise DogeError(self._divergence_message(step))
            paused = time.perf_counter()
            self._save(step)
            if self.config.hub.push and self.config.hub.strategy == "every_save" and step < total:
                self._push_checkpoint(step)
            self.window["paused_s"] += time.perf_counter() - paused
        warmup = self.config.train.moe_warmup_steps
        if warmup and step == warmup and step < total:
            self.logger.message(f"MoE warm-up done after step {step}: every tensor trains from now on")

    def finish(self, step: int, total: int) -> TrainResult:
        final_dir = None
        if step == total:
            final_dir = self._export()
            if self.acc.is_main_process:
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
                if self.config.hub.push:
                    self._push(final_dir, f"doge: final model after {step} steps")
        self.acc.wait_for_everyone()
        return TrainResult(self.run_dir, final_dir, step, self.last_loss, self.eval_loss)

    # -- data ---------------------------------------------------------------------------------
    def _step_batches(self, start: int, end: int):
        """The micro-batches of steps ``start .. end - 1``, built in ``runtime.dataloader_workers``
        background processes when that is above 0 (same batches, in the same order)."""
        source = StepBatches(self.obj, micro=self.micro, accum=self.accum, world=self.world, rank=self.rank,
                             seed=self.config.train.seed, start=start, end=end)
        workers = self.config.runtime.dataloader_workers
        if workers == 0 or end <= start:
            for step in range(start, end):
                yield source.for_step(step)
            return
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            raise DogeError("runtime.dataloader_workers > 0 needs the 'fork' start method, which this platform "
                            "lacks; set runtime.dataloader_workers=0")
        # Workers are forked: they share the loaded datasets and tokenizer instead of pickling them.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(
            source, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2,
            pin_memory=self.acc.device.type == "cuda", multiprocessing_context="fork",
        )
        yield from loader

    # -- pieces ---------------------------------------------------------------------------------
    def _configure_deepspeed(self) -> None:
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        ds = plugin.deepspeed_config
        # No dataloader goes through accelerate, so tell DeepSpeed the micro batch ourselves.
        ds["train_micro_batch_size_per_gpu"] = self.micro
        ds["gradient_accumulation_steps"] = self.accum
        # DeepSpeed clips inside its own step: give it optim.max_grad_norm (0 turns clipping off), or
        # accelerate would fill "auto" with 1.0 whatever the config says.
        want = float(self.config.optim.max_grad_norm)
        given = ds.get("gradient_clipping", "auto")
        if given in ("auto", None):
            ds["gradient_clipping"] = want
        elif float(given) != want:
            raise DogeError(f"the DeepSpeed config sets gradient_clipping {given} but optim.max_grad_norm is {want}; "
                            "make them agree (or write \"auto\" in the JSON to take doge's value)")

    @staticmethod
    def _new_window() -> dict[str, Any]:
        # paused_s: time spent evaluating, sampling and checkpointing, which throughput leaves out
        return {"loss": 0.0, "targets": 0, "tokens": 0, "steps": 0, "metrics": {}, "stats": {}, "micro_batches": 0,
                "t0": time.perf_counter(), "paused_s": 0.0}

    def _window_state(self) -> dict[str, Any]:
        """The unlogged sums of this process, as plain numbers (fp32 values, so they restore exactly)."""
        w = self.window
        return {"loss": float(w["loss"]), "targets": w["targets"], "tokens": w["tokens"], "steps": w["steps"],
                "micro_batches": w["micro_batches"], "metrics": {k: float(v) for k, v in w["metrics"].items()},
                "stats": {k: float(v) for k, v in w["stats"].items()}}

    def _window_from(self, saved: dict[str, Any]) -> dict[str, Any]:
        window = self._new_window()
        if not saved:
            return window

        def tensor(value):
            return torch.tensor(value, dtype=torch.float32, device=self.acc.device)

        window.update({k: saved.get(k, 0) for k in ("targets", "tokens", "steps", "micro_batches")})
        window["loss"] = tensor(saved.get("loss", 0.0))
        window["metrics"] = {k: tensor(v) for k, v in saved.get("metrics", {}).items()}
        window["stats"] = {k: tensor(v) for k, v in saved.get("stats", {}).items()}
        return window

    def _log_record(self, step: int, total: int) -> dict[str, Any]:
        acc, window = self.acc, self.window
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        # Throughput and MFU count the training steps (data, forward, backward, optimizer) only; evaluation,
        # sampling and checkpoints run between them and would charge their time to the steps.
        training = max(elapsed - window["paused_s"], 1e-9)
        loss = window["loss"]
        loss = loss.clone() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss), device=acc.device)
        loss_sum = acc.reduce(loss, reduction="sum")
        targets = acc.reduce(torch.tensor(float(window["targets"]), device=acc.device), reduction="sum")
        tokens = window["tokens"] * self.world
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss_sum / targets.clamp(min=1)),
            "lr": self.config.optim.lr * lr_multiplier(step - 1, total, self.config.schedule),
            **({"muon_lr": self.config.optim.muon_lr * lr_multiplier(step - 1, total, self.config.schedule)}
               if self.config.optim.name == "muon" else {}),
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": tokens / training,
            "mem_gb": peak_memory_gb(acc.device.type),
            # The window's own figures, so that sums over the records (doge report) give the run's wall time
            # and tokens, resumed runs included (metrics.jsonl is cut back to the checkpoint on resume).
            "tokens": tokens,
            "time_s": elapsed,
            "train_s": training,
        }
        if self.flops_per_target and self.peak:
            record["mfu"] = self.flops_per_target * tokens / training / (self.peak * self.world)
        for key, value in window["metrics"].items():
            record[key] = float(acc.reduce(value.clone(), reduction="sum") / targets.clamp(min=1))
        micro_batches = acc.reduce(torch.tensor(float(window["micro_batches"]), device=acc.device), reduction="sum")
        for key, value in window["stats"].items():
            record[key] = float(acc.reduce(value.clone(), reduction="sum") / micro_batches.clamp(min=1))
        return record

    def _any_nonfinite(self) -> bool:
        return bool(self.acc.reduce((~self.finite).float(), reduction="sum") > 0)

    def _divergence_message(self, step: int) -> str:
        last = ckpt.latest_checkpoint(self.run_dir)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        return (f"the loss became NaN or infinite by step {step}; {keep}. Lower optim.lr, raise "
                "schedule.warmup_ratio, or use runtime.precision=fp32, then resume with --resume auto")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean eval loss over the first ``logging.eval_batches`` micro-batches of the eval split.

        The same rows whatever the process count; every process runs the same number of forwards (one
        with no rows of its own repeats the first batch and drops the result), as ZeRO-3 requires.
        """
        data = self.obj.eval_data
        if data is None or len(data) == 0:
            return None
        acc, model = self.acc, self.train_model
        model.eval()
        total = torch.zeros((), device=acc.device)
        targets = 0
        n = min(len(data), self.config.logging.eval_batches * self.micro)
        for i in range(math.ceil(n / (self.micro * self.world))):
            start = (i * self.world + self.rank) * self.micro
            mine = start < n
            lo = start if mine else 0
            rows = data[lo:min(lo + self.micro, n)]
            rows = [{**dict(zip(rows, vals)), "_row": lo + j} for j, vals in enumerate(zip(*rows.values()))]
            batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v)
                     for k, v in self.obj.collate(rows).items()}
            with acc.autocast():
                out = self.obj.eval_loss(model, batch)
            if mine:
                total += out.loss_sum.float()
                targets += self.obj.count_targets(batch)
        model.train()
        total = acc.reduce(total, reduction="sum")
        count = acc.reduce(torch.tensor(float(targets), device=acc.device), reduction="sum")
        return float(total / count.clamp(min=1))

    @torch.no_grad()
    def sample(self) -> str:
        """A greedy continuation of ``logging.sample_prompt`` (as a user turn for chat stages)."""
        from doge_cli.inference import generate

        acc, tok = self.acc, self.obj.tokenizer
        prompt = self.config.logging.sample_prompt
        if self.config.stage != "pt" and tok.chat_template:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(
                prompt, add_special_tokens=False)["input_ids"]
        collective = gathers_weights_in_forward(acc)
        text = ""
        if acc.is_main_process or collective:  # under ZeRO-3/FSDP every process takes part in each forward
            model = self.module
            model.eval()
            with acc.autocast():
                out = generate(model, torch.tensor([ids], device=acc.device), max_new_tokens=SAMPLE_TOKENS,
                               stop_together=stop_together(acc))
            model.train()
            text = tok.decode(out.new_tokens[0, :int(out.lengths[0])], skip_special_tokens=True)
        return text

    def evaluate_tasks(self, step: int) -> dict[str, float]:
        """``logging.eval_tasks`` on the model as it is now: its ``eval/<task>/<metric>`` figures and
        ``eval_tasks_s``, the seconds they took (on the main process; the others' figures are dropped)."""
        acc = self.acc
        collective = gathers_weights_in_forward(acc)
        if not (acc.is_main_process or collective):  # under ZeRO-3/FSDP every process takes part in each forward
            return {}
        started = time.perf_counter()
        figures = self.task_eval.run(self.module, self.obj.tokenizer, acc, stop_together=stop_together(acc),
                                     log=self._say_once)
        seconds = time.perf_counter() - started
        if not acc.is_main_process:
            return {}
        self.logger.message(f"eval tasks at step {step} ({seconds:.1f} s): "
                            + ", ".join(f"{key.removeprefix('eval/')} {value:.4g}" for key, value in figures.items()))
        return {**figures, "eval_tasks_s": seconds}

    def _say_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.logger.message(text)

    def _uses_sharded_state(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def _save(self, step: int) -> None:
        state = {"step": step, "data_position": (step // self.obj.steps_per_batch) * self.config.train.global_batch_size,
                 "last_loss": self.last_loss, "eval_loss": self.eval_loss}
        ckpt.save(self.acc, self.run_dir, step, model=self.model, optimizer=self.optimizer,
                  sharded=self._uses_sharded_state(), rank_state={"window": self._window_state()}, state=state,
                  config_yaml=to_yaml(self.config), keep_last=self.config.checkpoint.keep_last)

    def _push(self, folder: Path, message: str) -> None:
        """Upload a model folder to hub.repo (main process). A failure is said and the run goes on."""
        from doge_cli.push import push

        hub = self.config.hub
        try:
            url = push(folder, hub.repo, private=hub.private, message=message)
        except Exception as err:  # the hub must never stop or change a run: say it, go on
            self.logger.message(f"hub push to {hub.repo} failed ({' '.join(str(err).split())[:200]}); the run goes "
                                f"on (push {folder} later with doge push)")
            return
        self.logger.message(f"pushed to {hub.repo}: {url}")

    def _push_checkpoint(self, step: int) -> None:
        """hub.strategy=every_save: the model as of this checkpoint, as a model folder, to hub.repo."""
        import tempfile

        from doge_cli.model import DogeForCausalLM, save_pretrained

        full_state = self.acc.get_state_dict(self.model)  # every process: ZeRO-3/FSDP gather here
        if self.acc.is_main_process:
            with tempfile.TemporaryDirectory(prefix="doge-hub-") as tmp:
                export = DogeForCausalLM(self.module.config, attn_implementation="eager")
                ckpt.load_weights_strictly(export, {k: v.detach().float().cpu() for k, v in full_state.items()},
                                           where="the weights at this checkpoint")
                folder = save_pretrained(export, Path(tmp) / "model", tokenizer=self.obj.tokenizer)
                self._push(folder, f"doge: checkpoint at step {step}")
        self.acc.wait_for_everyone()

    def _export(self) -> Path | None:
        """Write RUN/final as a Hugging Face model folder (full weights gathered under ZeRO-3/FSDP)."""
        from doge_cli.model import DogeForCausalLM, save_pretrained

        acc = self.acc
        full_state = acc.get_state_dict(self.model)
        final = self.run_dir / "final"
        if acc.is_main_process:
            export = DogeForCausalLM(self.module.config, attn_implementation="eager")
            ckpt.load_weights_strictly(export, {k: v.detach().float().cpu() for k, v in full_state.items()},
                                       where="the trained weights")
            save_pretrained(export, final, tokenizer=self.obj.tokenizer)
        acc.wait_for_everyone()
        return final
