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
_PANEL = "Several machines (forwarded to accelerate launch; one doge command per machine)"
NumMachinesOpt = Annotated[int | None, typer.Option(
    "--num-machines", min=1, rich_help_panel=_PANEL,
    help="Machines taking part; needs --accelerate-config, --machine-rank and --main-process-ip.")]
MachineRankOpt = Annotated[int | None, typer.Option(
    "--machine-rank", min=0, rich_help_panel=_PANEL, help="This machine's rank, 0 .. num-machines - 1 (Slurm: "
    "$SLURM_NODEID); machine 0 hosts the rendezvous. Not needed with --rdzv-backend c10d.")]
MainIpOpt = Annotated[str | None, typer.Option(
    "--main-process-ip", rich_help_panel=_PANEL, help="Address of machine 0 (the rendezvous), the same on every "
    "machine.")]
MainPortOpt = Annotated[int, typer.Option(
    "--main-process-port", min=1, max=65535, rich_help_panel=_PANEL, help="Port of the rendezvous on machine 0.")]
RdzvOpt = Annotated[str, typer.Option(
    "--rdzv-backend", rich_help_panel=_PANEL, help="static: ranks from --machine-rank; c10d: torch's rendezvous "
    "assigns them (machines may start in any order).")]
PerMachineOpt = Annotated[int | None, typer.Option(
    "--processes-per-machine", min=1, rich_help_panel=_PANEL, help="Processes (GPUs) on each machine; default: "
    "the accelerate config's num_processes (per machine when it describes one machine).")]


@dataclass
class Machines:
    """Where the processes of a run live: one machine (all None), or several (the flags above)."""

    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int = 29500
    rdzv_backend: str = "static"
    processes_per_machine: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.num_machines, self.machine_rank, self.main_process_ip,
                                           self.processes_per_machine))

    def launch_args(self, accelerate_config: str | None) -> list[str]:
        """``accelerate launch`` arguments for these machines (none for one machine), checked first."""
        from doge_cli.errors import DogeError

        if not self.given():
            return []
        if not accelerate_config:
            raise DogeError("--num-machines and the other several-machine flags need --accelerate-config (e.g. "
                            "configs/accelerate/ddp.yaml on GPUs, zero2.yaml for DeepSpeed)")
        if self.num_machines is None:
            raise DogeError("--machine-rank, --main-process-ip and --processes-per-machine need --num-machines")
        if self.rdzv_backend not in ("static", "c10d"):
            raise DogeError(f"--rdzv-backend {self.rdzv_backend!r} is not one of static, c10d")
        config = _read_launcher(accelerate_config)
        in_file = int(getattr(config, "num_processes", None) or 1)
        machines_in_file = int(getattr(config, "num_machines", None) or 1)
        per_machine = self.processes_per_machine or max(1, in_file // machines_in_file)
        if self.num_machines == 1:
            return ["--num_processes", str(per_machine)] if self.processes_per_machine else []
        if not self.main_process_ip:
            raise DogeError("--num-machines above 1 needs --main-process-ip, the address of machine 0 (the same on "
                            "every machine)")
        rank = self.machine_rank
        if rank is None:
            if self.rdzv_backend == "static":
                raise DogeError("--num-machines above 1 needs --machine-rank (0 on the machine at --main-process-ip, "
                                "then 1, 2, ...), or --rdzv-backend c10d to have the ranks assigned")
            rank = 0  # accelerate wants a number; torchrun's c10d rendezvous assigns the real one
        if rank >= self.num_machines:
            raise DogeError(f"--machine-rank {rank} is out of range for --num-machines {self.num_machines} "
                            f"(0 .. {self.num_machines - 1})")
        out = ["--num_machines", str(self.num_machines), "--num_processes", str(per_machine * self.num_machines),
               "--machine_rank", str(rank), "--main_process_ip", self.main_process_ip,
               "--main_process_port", str(self.main_process_port), "--rdzv_backend", self.rdzv_backend]
        if str(getattr(config, "distributed_type", "")).upper().endswith("DEEPSPEED"):
            named = (getattr(config, "deepspeed_config", None) or {}).get("deepspeed_multinode_launcher")
            if named not in (None, "standard"):
                raise DogeError(f"accelerate config {accelerate_config} starts the machines with DeepSpeed's "
                                f"{named} launcher from one machine (its hostfile); with --num-machines doge runs "
                                "one launcher per machine: drop deepspeed_multinode_launcher, or drop the flags")
            out += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on each machine, as for DDP
        return out


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
    machines: Machines | None = None

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
    machines = run.machines or Machines()
    if run.accelerate_config:
        check_accelerate_config(run.accelerate_config)
    spread = machines.launch_args(run.accelerate_config)
    if run.accelerate_config:
        # accelerate launch, in doge's wrapper: the failing process's exit code comes back, without a traceback
        cmd = [sys.executable, "-m", "doge_cli.cli.launch", "--config_file", run.accelerate_config,
               *spread, "-m", "doge_cli", *run.argv()]
        raise typer.Exit(subprocess.call(cmd))
    from doge_cli.config.loader import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    recipe, _ = split_recipe_and_overrides(run.args)
    config = resolve_config(run.stage, size=run.size, hardware=run.hardware, recipe=recipe, overrides=run.overrides())
    result = train(config, objective_for(config), resume=run.resume, overwrite=run.overwrite)
    if result.final_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"final model: {result.final_dir}")


def _read_launcher(config_file: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(config_file)


def check_accelerate_config(config_file: str) -> None:
    """Read the launcher config as ``accelerate launch`` will, so a broken one is one line here, not a
    traceback from every launched process; a DeepSpeed JSON it names must exist and parse."""
    import json

    from doge_cli.errors import DogeError

    if not os.path.isfile(config_file):
        raise DogeError(f"accelerate config {config_file} does not exist; see configs/accelerate/")
    try:
        config = _read_launcher(config_file)
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
    num_machines: NumMachinesOpt = None,
    machine_rank: MachineRankOpt = None,
    main_process_ip: MainIpOpt = None,
    main_process_port: MainPortOpt = 29500,
    rdzv_backend: RdzvOpt = "static",
    processes_per_machine: PerMachineOpt = None,
) -> None:
    """Pretrain Doge-Base from the merged pretraining dataset (doge data merge --stage pt)."""
    machines = Machines(num_machines, machine_rank, main_process_ip, main_process_port, rdzv_backend,
                        processes_per_machine)
    run_stage(StageRun("pt", args, size, hardware, resume, overwrite, accelerate_config, init_from, output_dir,
                       machines))


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
        num_machines: NumMachinesOpt = None,
        machine_rank: MachineRankOpt = None,
        main_process_ip: MainIpOpt = None,
        main_process_port: MainPortOpt = 29500,
        rdzv_backend: RdzvOpt = "static",
        processes_per_machine: PerMachineOpt = None,
    ) -> None:
        machines = Machines(num_machines, machine_rank, main_process_ip, main_process_port, rdzv_backend,
                            processes_per_machine)
        run_stage(StageRun(stage, args, size, hardware, resume, overwrite, accelerate_config, model, output_dir,
                           machines))

    command.__doc__ = summary
    command.__name__ = f"train_{stage}"
    return command


train_sft = app.command("sft")(_post_training_command(
    "sft", "Supervised fine-tuning on chat data, loss on assistant tokens (Doge-Instruct SFT, R1 distillation)."))
train_dpo = app.command("dpo")(_post_training_command(
    "dpo", "Direct preference optimisation of an SFT model on chosen/rejected pairs (Doge-Instruct)."))
train_grpo = app.command("grpo")(_post_training_command(
    "grpo", "GRPO with verifiable rewards on maths prompts (Doge-R1)."))
