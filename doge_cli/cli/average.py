"""``doge average``: checkpoints of a run averaged into one model folder (doge_cli.train.average)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from doge_cli.errors import DogeError


def average(
    checkpoints: Annotated[list[Path] | None, typer.Argument(
        help="Checkpoint folders (RUN/checkpoints/step-N) or model folders, oldest first.", show_default=False)] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Average the last --last checkpoints of this run.")] = None,
    last: Annotated[int, typer.Option("--last", help="How many of the run's newest checkpoints (with --run).")] = 4,
    method: Annotated[str, typer.Option("--method", help="sma (plain mean), ema (exponential, --alpha), wma "
                                        "(linear weights, newest heaviest).")] = "sma",
    alpha: Annotated[float, typer.Option("--alpha", help="EMA factor: the newest source's share before "
                                         "normalising.")] = 0.2,
    out: Annotated[Path | None, typer.Option("--out", help="The model folder to write.", show_default=False)] = None,
    template: Annotated[str | None, typer.Option(
        "--template", help="Model folder giving config and tokenizer (default: the run's final/, or the first "
        "source when it is a model folder).")] = None,
) -> None:
    """Average the weights of several checkpoints into one Hugging Face model folder (SMA, EMA or WMA),
    e.g. the last stable-phase checkpoints of a warmup-stable-decay run."""
    from doge_cli.train.average import METHODS, sources_of_run
    from doge_cli.train.average import average as run_average

    if out is None:
        raise DogeError("--out is required: the model folder to write")
    if method not in METHODS:
        raise DogeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if run is not None and checkpoints:
        raise DogeError("give checkpoint folders or --run, not both")
    if run is not None:
        sources = sources_of_run(run, last)
    elif checkpoints:
        sources = list(checkpoints)
    else:
        raise DogeError("nothing to average: give checkpoint folders, or --run RUN_DIR --last K")
    written = run_average(sources, method, out, alpha=alpha, template=template)
    typer.echo(f"averaged {len(sources)} checkpoint{'s' if len(sources) > 1 else ''} ({method}) into {written}")
