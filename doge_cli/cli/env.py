"""``doge env``: versions, devices and offline status, for bug reports."""

from __future__ import annotations

from typing import Annotated

import typer


def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print Python and library versions, CPU features, GPUs and offline status."""
    import json

    from doge_cli.env_info import collect_env

    info = collect_env()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value) or "none"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    Console().print(table)
