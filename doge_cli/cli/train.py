"""``doge train``: pretraining and post-training stages on the shared training core."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Annotated

import typer

from doge_cli.cli.options import HardwareOpt, RecipeAndOverridesArg, SizeOpt, split_recipe_and_overrides

app = typer.Typer(help="Train a Doge model: pretraining (pt), then sft, dpo and grpo, all on one core.",
                  no_args_is_help=True)

ResumeOpt = Annotated[
    str | None,
    typer.Option("--resume", help="'auto' continues from the newest complete checkpoint in the run folder; "
                 "or a checkpoint folder RUN/checkpoints/step-NNNNNN."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")]
AccelerateOpt = Annotated[
    str | None,
    typer.Option("--accelerate-config", help="Relaunch under 'accelerate launch --config_file FILE' "
                 "(configs/accelerate/{single_gpu,ddp,zero2,zero3,fsdp}.yaml)."),
]
OutputOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="Run folder (sets output_dir).")]


def _run_stage(stage: str, args, size, hardware, resume, overwrite, accelerate_config, extra: list[str]) -> None:
    if accelerate_config:
        _relaunch(accelerate_config, stage, args, size, hardware, resume, overwrite, extra)
        return
    from doge_cli.config.loader import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    recipe, overrides = split_recipe_and_overrides(args)
    config = resolve_config(stage, size=size, hardware=hardware, recipe=recipe, overrides=[*overrides, *extra])
    result = train(config, objective_for(config), resume=resume, overwrite=overwrite)
    if result.final_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final model: {result.final_dir}")


def check_accelerate_config(config_file: str) -> None:
    """Read the launcher config as ``accelerate launch`` will, so a broken one is one line here, not a
    traceback from every launched process; a DeepSpeed JSON it names must exist and parse."""
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    from doge_cli.errors import DogeError

    if not os.path.isfile(config_file):
        raise DogeError(f"accelerate config {config_file} does not exist; see configs/accelerate/")
    try:
        config = load_config_from_file(config_file)
    except Exception as err:  # yaml, unknown keys, bad enum values, not a mapping: all one message
        first = " ".join(str(err).split())[:200] or type(err).__name__
        raise DogeError(f"accelerate config {config_file} is not valid ({first}); start from one in "
                        "configs/accelerate/") from None
    ds_file = (getattr(config, "deepspeed_config", None) or {}).get("deepspeed_config_file")
    if ds_file:
        try:
            json.loads(open(ds_file, encoding="utf-8").read())
        except FileNotFoundError:
            raise DogeError(f"accelerate config {config_file} names DeepSpeed config {ds_file}, which does not exist "
                            "(paths are relative to where you run doge)") from None
        except (OSError, ValueError) as err:
            raise DogeError(f"DeepSpeed config {ds_file} is not valid JSON ({err})") from None


def _relaunch(config_file: str, stage, args, size, hardware, resume, overwrite, extra: list[str]) -> None:
    """Run this stage again under ``accelerate launch``: the command is rebuilt from the parsed
    values (never from ``sys.argv``, which belongs to whatever process called doge)."""
    check_accelerate_config(config_file)
    argv = ["train", stage, *(args or []), *extra]
    for flag, value in (("--size", size), ("--hardware", hardware), ("--resume", resume)):
        if value is not None:
            argv += [flag, value]
    if overwrite:
        argv.append("--overwrite")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "-m", "doge_cli", *argv]
    raise typer.Exit(subprocess.call(cmd))


@app.command("pt")
def train_pt(
    args: RecipeAndOverridesArg = None,
    size: SizeOpt = None,
    hardware: HardwareOpt = None,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Continue pretraining from this model "
                                                  "folder or hub id (the reason for warmup-stable-decay).")] = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Pretrain Doge-Base from the merged pretraining dataset (doge data merge --stage pt)."""
    extra = [f"init_from={init_from}"] if init_from else []
    if output_dir:
        extra.append(f"output_dir={output_dir}")
    _run_stage("pt", args, size, hardware, resume, overwrite, accelerate_config, extra)


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model folder or hub id to start from (sets init_from); required unless "
                 "the recipe sets init_from."),
]


def _post_training(stage: str, args, size, hardware, model, output_dir, resume, overwrite, accelerate_config) -> None:
    from doge_cli.errors import DogeError

    extra = [f"init_from={model}"] if model else []
    if output_dir:
        extra.append(f"output_dir={output_dir}")
    if not model and not accelerate_config:
        from doge_cli.config.loader import resolve_config

        recipe, overrides = split_recipe_and_overrides(args)
        config = resolve_config(stage, size=size, hardware=hardware, recipe=recipe, overrides=[*overrides, *extra])
        if not config.init_from:
            raise DogeError(f"doge train {stage} needs a model to start from: pass --model PATH|HUB_ID "
                            "(e.g. the final/ folder of the previous stage) or set init_from in the recipe")
    _run_stage(stage, args, size, hardware, resume, overwrite, accelerate_config, extra)


@app.command("sft")
def train_sft(
    args: RecipeAndOverridesArg = None,
    model: ModelOpt = None,
    size: SizeOpt = None,
    hardware: HardwareOpt = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Supervised fine-tuning on chat data, loss on assistant tokens (Doge-Instruct SFT, R1 distillation)."""
    _post_training("sft", args, size, hardware, model, output_dir, resume, overwrite, accelerate_config)


@app.command("dpo")
def train_dpo(
    args: RecipeAndOverridesArg = None,
    model: ModelOpt = None,
    size: SizeOpt = None,
    hardware: HardwareOpt = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """Direct preference optimisation of an SFT model on chosen/rejected pairs (Doge-Instruct)."""
    _post_training("dpo", args, size, hardware, model, output_dir, resume, overwrite, accelerate_config)


@app.command("grpo")
def train_grpo(
    args: RecipeAndOverridesArg = None,
    model: ModelOpt = None,
    size: SizeOpt = None,
    hardware: HardwareOpt = None,
    output_dir: OutputOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    accelerate_config: AccelerateOpt = None,
) -> None:
    """GRPO with verifiable rewards on maths prompts (Doge-R1)."""
    _post_training("grpo", args, size, hardware, model, output_dir, resume, overwrite, accelerate_config)
