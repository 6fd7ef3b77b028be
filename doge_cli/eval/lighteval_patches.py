"""Every place doge reaches into lighteval (0.13) beyond its public API, each with the reason.

``tests/eval/test_lighteval_patches.py`` checks that what is patched still exists in the installed
lighteval with the shape assumed here, so an upgrade that moves it fails that test loudly instead of
silently undoing a patch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_LOGGERS = ("lighteval", "datasets", "accelerate")


@contextmanager
def only_these_tasks(configs: list) -> Iterator[None]:
    """lighteval's ``Registry.load_all_task_configs`` imports every task module, and some of them reach
    the network at import; within this block the registry sees only ``configs``."""
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__["load_all_task_configs"]
    table = {c.name: c for c in configs}
    Registry.load_all_task_configs = staticmethod(lambda custom_tasks=None, load_multilingual=False: dict(table))
    try:
        yield
    finally:
        Registry.load_all_task_configs = original


@contextmanager
def quiet() -> Iterator[None]:
    """lighteval logs every step and draws a progress bar per bootstrap (it reads the module global
    ``stderr.LIGHTEVAL_DISABLE_TQDM`` at each call); doge prints its own summary instead."""
    import datasets
    from lighteval.metrics.utils import stderr

    datasets.disable_progress_bars()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    bar = stderr.LIGHTEVAL_DISABLE_TQDM
    stderr.LIGHTEVAL_DISABLE_TQDM = True
    try:
        yield
    finally:
        stderr.LIGHTEVAL_DISABLE_TQDM = bar
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def import_pipeline():
    """``(EvaluationTracker, ParallelismManager, Pipeline, PipelineParameters)``, imported with autograd
    handed back afterwards: importing lighteval's transformers backend calls
    ``torch.set_grad_enabled(False)`` for the whole process, which would leave a caller that trains
    after evaluating (the demo, notebooks, tests) without gradients."""
    import torch

    grad_mode = torch.is_grad_enabled()
    try:
        from lighteval.logging.evaluation_tracker import EvaluationTracker
        from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters
    finally:
        torch.set_grad_enabled(grad_mode)
    return EvaluationTracker, ParallelismManager, Pipeline, PipelineParameters


class NoCache:
    """Stands in for a lighteval model's sample cache: the Pipeline hands its task registry to
    ``model._cache._init_registry``; doge keeps no cache, so a rerun evaluates the model as it is now."""

    def _init_registry(self, registry) -> None:
        pass
