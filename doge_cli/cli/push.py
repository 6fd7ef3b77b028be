"""``doge push``: a model folder to the Hugging Face hub with a model card (doge_cli.push)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def push(
    model: Annotated[Path, typer.Argument(help="Model folder (e.g. runs/sft/final) or run folder.",
                                          show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo id, OWNER/NAME.", show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (when it does not exist).")]
    = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created when missing).")]
    = None,
    license: Annotated[str, typer.Option("--license", help="License in the model card.")] = "apache-2.0",
    eval_paths: Annotated[list[Path] | None, typer.Option(
        "--eval", help="doge eval results for the card: its --output-dir or JSON files (repeatable).")] = None,
    message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
) -> None:
    """Upload a model folder to the Hugging Face hub with a generated model card (front matter for the hub,
    how to load it, the run's figures and eval results). Needs a token (hf auth login or HF_TOKEN)."""
    from doge_cli.push import license_ok
    from doge_cli.push import push as run_push

    url = run_push(model, repo, private=private, revision=revision, license=license_ok(license),
                   eval_paths=list(eval_paths or []), message=message)
    typer.echo(f"pushed {model} to {repo}: {url}")
