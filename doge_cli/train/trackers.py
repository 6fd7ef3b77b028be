"""Experiment trackers besides metrics.jsonl: TensorBoard, Weights & Biases and trackio (``logging.report_to``).

Only the main process logs. wandb and trackio are an optional extra (``pip install 'doge-cli[track]'``);
asking for one without its package, or for online wandb logging without a login, is a one-line error
before training starts (:func:`check`). trackio logs to its local store (``TRACKIO_DIR``, by default
``~/.cache/huggingface/trackio``; ``trackio show`` opens its dashboard), in ``logging.project``, as the run
``<run folder name>-<id>``; its id and last step are kept in ``RUN/trackio_run.json`` as wandb's are. The wandb run's id is kept in ``RUN/wandb_run.json`` with the last step sent, so a
``--resume`` continues the same run and never sends a step twice (the steps retrained after the
checkpoint are the same steps with the same values, since resume is exact, and wandb already has them).
Online, the run goes to ``logging.project``; with ``WANDB_MODE=offline`` it is written under
``RUN/wandb/`` for ``wandb sync`` later.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from doge_cli.errors import DogeError
from doge_cli.io import write_text_atomic

WANDB_STATE = "wandb_run.json"


def wanted(logging_config) -> list[str]:
    names = list(logging_config.report_to)
    if logging_config.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check(logging_config) -> None:
    """Refuse, before anything is written, a tracker that cannot work here."""
    names = wanted(logging_config)
    if "tensorboard" in names:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise DogeError("logging.report_to has tensorboard, which is not installed; install it with: "
                            "pip install tensorboard") from None
    if "trackio" in names:
        try:
            import trackio  # noqa: F401
        except ImportError:
            raise DogeError("logging.report_to has trackio, which is not installed; install it with: "
                            "pip install 'doge-cli[track]'") from None
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise DogeError("logging.report_to has wandb, which is not installed; install it with: "
                            "pip install 'doge-cli[track]'") from None
        mode = os.environ.get("WANDB_MODE", "online").lower()
        if mode not in ("offline", "disabled", "dryrun") and not _wandb_logged_in():
            raise DogeError("logging.report_to has wandb, but wandb has no login here; run `wandb login` (or set "
                            "WANDB_API_KEY), or set WANDB_MODE=offline to log under the run folder")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://", 1)[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    def __init__(self, run_dir: Path, *, project: str, config: dict[str, Any], resume_step: int):
        import wandb

        self.state_path = Path(run_dir) / WANDB_STATE
        state = json.loads(self.state_path.read_text()) if resume_step and self.state_path.is_file() else {}
        run_id = state.get("id") or uuid.uuid4().hex[:12]
        self.last_step = int(state.get("last_step", 0))
        # console="off": doge prints its own progress; wandb's capture of stdout would double it.
        self.run = wandb.init(project=project, name=Path(run_dir).name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config, settings=wandb.Settings(console="off"))
        self._save()

    def _save(self) -> None:
        write_text_atomic(self.state_path, json.dumps({"id": self.run.id, "last_step": self.last_step}))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if step <= self.last_step:  # sent before the run was interrupted and resumed
            return
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        self.run.log(values, step=step)
        self.last_step = step
        self._save()

    def close(self) -> None:
        self.run.finish()


TRACKIO_STATE = "trackio_run.json"


class TrackioTracker:
    """trackio's local run: the same steps and values as metrics.jsonl, the resolved config, continued on
    ``--resume`` without sending a step twice (as :class:`WandbTracker`)."""

    def __init__(self, run_dir: Path, *, project: str, config: dict[str, Any], resume_step: int):
        import trackio

        self.state_path = Path(run_dir) / TRACKIO_STATE
        state = json.loads(self.state_path.read_text()) if resume_step and self.state_path.is_file() else {}
        self.name = state.get("name") or f"{Path(run_dir).name}-{uuid.uuid4().hex[:8]}"
        self.last_step = int(state.get("last_step", 0))
        self.run = trackio.init(project=project, name=self.name, config=config, resume="allow" if state else "never",
                                auto_log_gpu=False, auto_log_cpu=False, embed=False)
        self._save()

    def _save(self) -> None:
        write_text_atomic(self.state_path, json.dumps({"name": self.name, "last_step": self.last_step}))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if step <= self.last_step:  # sent before the run was interrupted and resumed
            return
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        self.run.log(values, step=step)
        self.last_step = step
        self._save()

    def close(self) -> None:
        self.run.finish()
