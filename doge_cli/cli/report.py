"""``doge report``: a report card for a pipeline of runs (doge_cli.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (output_dir of doge train), in pipeline order.",
                                               show_default=False)],
    eval_paths: Annotated[list[Path] | None, typer.Option(
        "--eval", help="doge eval results: its --output-dir or JSON files (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", help="The Markdown report; its loss-curve PNG goes beside it.")]
    = Path("report.md"),
    as_html: Annotated[bool, typer.Option("--html", help="Also write a self-contained HTML page beside it.")] = False,
) -> None:
    """Write one report for a pipeline (or one run): environment, per stage wall time, tokens, steps,
    losses, tokens/s, MFU and key settings, the eval results side by side, and every stage's loss curves."""
    from doge_cli.report import write_report

    written = write_report(list(runs), out, eval_paths=list(eval_paths or []), as_html=as_html)
    for path in written:
        typer.echo(f"wrote {path}")
