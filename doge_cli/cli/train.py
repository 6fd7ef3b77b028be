"""``doge train``: pretraining and post-training stages on the shared training core."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass
class StageRun:
    """What a ``doge train STAGE`` command line asks for, by name."""

    stage: str
    args: list[str] | None
    size: str | None
    hardware: str | None
    resume: str | None
    overwrite: bool
    accelerate_config: str | None
    init_from: str | None = None
    output_dir: str | None = None

    def overrides(self) -> list[str]:
        """The recipe's overrides, then those the flags stand for (they win)."""
        _, overrides = split_recipe_and_overrides(self.args)
        extra = [f"init_from={self.init_from}"] if self.init_from else []
        return [*overrides, *extra, *([f"output_dir={self.output_dir}"] if self.output_dir else [])]

    def argv(self) -> list[str]:
        """This command line again (for ``accelerate launch``), rebuilt from the parsed values, never
        from ``sys.argv``, which belongs to whatever process called doge."""
        recipe, _ = split_recipe_and_overrides(self.args)
        out = ["train", self.stage, *([recipe] if recipe else []), *self.overrides()]
        for flag, value in (("--size", self.size), ("--hardware", self.hardware), ("--resume", self.resume)):
            if value is not None:
                out += [flag, value]
        return out + (["--overwrite"] if self.overwrite else [])


def name_the_cpu_for_deepspeed() -> None:
    """DeepSpeed (which accelerate imports) logs "Setting accelerator to CPU. If you have GPU ..." in every
    process whenever it finds no GPU; on a machine without one doge names the CPU accelerator for it
    (``DS_ACCELERATOR=cpu``, unless the environment sets one), so the run's log holds doge's lines."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def run_stage(run: StageRun) -> None:
    """Resolve the config and train on the one core (or relaunch under accelerate first)."""
    name_the_cpu_for_deepspeed()
    if run.accelerate_config:
        check_accelerate_config(run.accelerate_config)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", run.accelerate_config,
               "-m", "doge_cli", *run.argv()]
        raise typer.Exit(subprocess.call(cmd))
    from doge_cli.config.loader import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    recipe, _ = split_recipe_and_overrides(run.args)
    config = resolve_config(run.stage, size=run.size, hardware=run.hardware, recipe=recipe, overrides=run.overrides())
    result = train(config, objective_for(config), resume=run.resume, overwrite=run.overwrite)
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
    run_stage(StageRun("pt", args, size, hardware, resume, overwrite, accelerate_config, init_from, output_dir))


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model folder or hub id to start from (sets init_from); required unless "
                 "the recipe sets init_from."),
]


def _post_training_command(stage: str, summary: str):
    """The command of a post-training stage: one signature for sft, dpo and grpo (the objective checks
    that a start model was given, once)."""

    def command(
        args: RecipeAndOverridesArg = None,
        model: ModelOpt = None,
        size: SizeOpt = None,
        hardware: HardwareOpt = None,
        output_dir: OutputOpt = None,
        resume: ResumeOpt = None,
        overwrite: OverwriteOpt = False,
        accelerate_config: AccelerateOpt = None,
    ) -> None:
        run_stage(StageRun(stage, args, size, hardware, resume, overwrite, accelerate_config, model, output_dir))

    command.__doc__ = summary
    command.__name__ = f"train_{stage}"
    return command


train_sft = app.command("sft")(_post_training_command(
    "sft", "Supervised fine-tuning on chat data, loss on assistant tokens (Doge-Instruct SFT, R1 distillation)."))
train_dpo = app.command("dpo")(_post_training_command(
    "dpo", "Direct preference optimisation of an SFT model on chosen/rejected pairs (Doge-Instruct)."))
train_grpo = app.command("grpo")(_post_training_command(
    "grpo", "GRPO with verifiable rewards on maths prompts (Doge-R1)."))
