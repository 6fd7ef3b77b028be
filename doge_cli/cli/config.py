"""``doge config``: inspect the resolved configuration of a training stage."""

from __future__ import annotations

from typing import Annotated

import typer

from doge_cli.cli.options import HardwareOpt, RecipeAndOverridesArg, SizeOpt, split_recipe_and_overrides

app = typer.Typer(help="Inspect resolved training configurations.", no_args_is_help=True)

STAGE_HELP = "Training stage: pt (pretraining), sft, dpo or grpo."


@app.command("show")
def config_show(
    stage: Annotated[str, typer.Argument(help=STAGE_HELP, show_default=False)],
    args: RecipeAndOverridesArg = None,
    size: SizeOpt = None,
    hardware: HardwareOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Document every key above it.")] = False,
    save: Annotated[str | None, typer.Option("--save", help="Also write the YAML to this file.")] = None,
) -> None:
    """Print the fully resolved config of STAGE as YAML (what `doge train STAGE` would run)."""
    from doge_cli.config.loader import resolve_config, summary_lines, to_yaml
    from doge_cli.io import check_file_target, write_text_atomic

    recipe, overrides = split_recipe_and_overrides(args)
    config = resolve_config(stage, size=size, hardware=hardware, recipe=recipe, overrides=overrides)
    text = "".join(f"# {line}\n" for line in summary_lines(config)) + to_yaml(config, explain=explain)
    if save:
        check_file_target(save, is_ours=_is_saved_config, what="--save file")
        write_text_atomic(save, text)
    typer.echo(text, nl=False)


def _is_saved_config(path) -> bool:
    """A file an earlier ``doge config show --save`` wrote: its summary header, then a stage config."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith("# stage ") and "\nstage: " in text
