"""``logging.eval_tasks``: ``doge eval``'s tasks run in-process while a run trains (downstream ability over
the run, not only its loss; nanochat's ``--core-metric-every`` is the same idea).

Everything a task needs (its data, a chat template, the hub for hub tasks) is checked by :func:`prepare`
before training starts, so a missing datasets folder fails then, in one line, not at the first evaluation.
Each evaluation runs :func:`doge_cli.eval.run.evaluate_loaded` on the bare model being trained, in eval
mode under the run's autocast, and hands the model back in train mode. It draws from no random stream the
training uses: the global random states (Python, NumPy, torch, the device's) are put back afterwards,
since lighteval reseeds Python's and NumPy's, so a run trains the same with or without it.

Under DDP only the main process evaluates (the others wait at the next collective step); under ZeRO-3 and
FSDP, where every forward gathers the sharded weights collectively, every process runs the same
evaluation (the same documents in the same batches, and generation that stops only when every process is
done), and only the main process's figures are logged.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from doge_cli.errors import DogeError

SETTING = "logging.eval_tasks_datasets_dir"
# Counts in a task's results that say how much was scored, not how well: left out of the metrics record.
BOOKKEEPING = ("samples", "truncated", "skipped", "tokens", "subtasks")


@dataclass
class TaskEvaluation:
    """The checked plan of a run's in-training evaluation."""

    names: list[str]  # expanded task names, in the order asked
    configs: list  # their lighteval configs (the stage tasks have none)
    datasets_dir: Path
    every: int
    max_samples: int
    batch_size: int
    use_chat_template: bool

    def due(self, step: int, total: int) -> bool:
        return step == total or bool(self.every and step % self.every == 0)

    def describe(self) -> str:
        when = f"every {self.every} steps and at the last step" if self.every else "at the last step"
        chat = ", asked in the chat template" if self.use_chat_template else ""
        return (f"eval tasks: {', '.join(self.names)} on the first {self.max_samples} examples of each, {when}"
                f"{chat} (logged as eval/<task>/<metric>)")

    def run(self, model, tokenizer, acc, *, stop_together: Callable[[bool], bool] | None,
            log: Callable[[str], None]) -> dict[str, float]:
        """Evaluate ``model`` (the bare module) now; returns the flat ``eval/<task>/<metric>`` figures."""
        from doge_cli.eval.run import evaluate_loaded

        was_training = model.training
        model.eval()
        try:
            with kept_random_state(acc.device), torch.no_grad(), acc.autocast():
                found = evaluate_loaded(model, tokenizer, self.names, self.configs, name="training",
                                        datasets_dir=self.datasets_dir, max_samples=self.max_samples,
                                        batch_size=self.batch_size, use_chat_template=self.use_chat_template,
                                        stop_together=stop_together, log=log)
        finally:
            model.train(was_training)
        return flatten(found["tasks"])


def prepare(config, tokenizer) -> TaskEvaluation | None:
    """The plan for ``config.logging.eval_tasks`` (None when empty), after checking everything the tasks
    need with this run's tokenizer: DogeError (one line) for missing data, a chat stage whose tokenizer has no
    chat template, or hub tasks while the hub is offline. Imports lighteval, so the first evaluation does not
    pay for it."""
    from doge_cli.eval import lighteval_patches
    from doge_cli.eval.stages import STAGE_TASKS, check_stage_task
    from doge_cli.eval.tasks import expand_task_names, task_configs

    cfg = config.logging
    if not cfg.eval_tasks:
        return None
    names = expand_task_names(cfg.eval_tasks)
    datasets_dir = Path(cfg.eval_tasks_datasets_dir)
    use_chat_template = config.stage != "pt"
    if use_chat_template and not tokenizer.chat_template:
        raise DogeError(f"logging.eval_tasks: a {config.stage} run asks its tasks in the chat template, but its "
                        "tokenizer has none; train with a tokenizer that has one (data.tokenizer)")
    configs = task_configs(names, datasets_dir, SETTING)
    for name in names:
        if name in STAGE_TASKS:
            check_stage_task(name, tokenizer, datasets_dir, SETTING)
    if configs:
        lighteval_patches.import_pipeline()
    return TaskEvaluation(names=names, configs=configs, datasets_dir=datasets_dir, every=cfg.eval_tasks_every,
                          max_samples=cfg.eval_tasks_max_samples, batch_size=config.runtime.micro_batch_size,
                          use_chat_template=use_chat_template)


def flatten(tasks: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{task: {metric: value}}`` as ``{"eval/<task>/<metric>": value}``, without standard errors and counts."""
    return {f"eval/{task}/{metric}": float(value) for task, metrics in tasks.items()
            for metric, value in metrics.items()
            if not metric.endswith("_stderr") and metric not in BOOKKEEPING}


@contextmanager
def kept_random_state(device: torch.device):
    """Put back the global random states (Python, NumPy, torch's CPU and ``device``'s) on leaving."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices: list[Any] = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
