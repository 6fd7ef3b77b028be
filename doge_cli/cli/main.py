"""The ``doge`` root command: registers one sub-app per command group and maps user errors
to a one-line message with exit code 2."""

from __future__ import annotations

import sys

import typer
import typer.core

from doge_cli import __version__
from doge_cli.cli import average as average_cmd
from doge_cli.cli import chat as chat_cmd
from doge_cli.cli import config as config_cmd
from doge_cli.cli import data as data_cmd
from doge_cli.cli import env as env_cmd
from doge_cli.cli import eval as eval_cmd
from doge_cli.cli import push as push_cmd
from doge_cli.cli import report as report_cmd
from doge_cli.cli import serve as serve_cmd
from doge_cli.cli import train as train_cmd
from doge_cli.cli import upcycle as upcycle_cmd
from doge_cli.errors import DogeError

# `doge --help` lists the commands in the order of the pipeline, one sentence each (their own --help says more).
ORDER = ("data", "train", "eval", "chat", "serve", "upcycle", "average", "report", "push", "config", "env")
SHORT_HELP = {
    "data": "Get data (hub, builtin, local files), train a tokenizer, tokenize it and merge it.",
    "train": "Train a Doge model: pt, then sft, dpo and grpo.",
    "eval": "Evaluate models with lighteval and doge's stage tasks, side by side.",
    "chat": "Chat with a model in the terminal.",
    "serve": "Serve a model over OpenAI's API, with a chat page.",
    "upcycle": "Turn a dense Doge into a mixture-of-experts Doge to continue pretraining.",
    "average": "Average checkpoints of a run into one model.",
    "report": "Write one report of a pipeline's runs and evaluations.",
    "push": "Upload a model or a run to the Hugging Face hub with a model card.",
    "config": "Show the resolved training configuration.",
    "env": "Print versions, hardware and whether the hub is reachable.",
}


class _PipelineOrder(typer.core.TyperGroup):
    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


app = typer.Typer(
    name="doge",
    cls=_PipelineOrder,
    help="Train small Doge language models end to end: data, tokenizer, pretraining, SFT, DPO, "
    "GRPO, evaluation and chat. Offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.add_typer(data_cmd.app, name="data", short_help=SHORT_HELP["data"])
app.add_typer(train_cmd.app, name="train", short_help=SHORT_HELP["train"])
app.command("eval", short_help=SHORT_HELP["eval"])(eval_cmd.eval_models)
app.command("chat", short_help=SHORT_HELP["chat"])(chat_cmd.chat)
app.command("serve", short_help=SHORT_HELP["serve"])(serve_cmd.serve)
app.command("upcycle", short_help=SHORT_HELP["upcycle"])(upcycle_cmd.upcycle)
app.command("average", short_help=SHORT_HELP["average"])(average_cmd.average)
app.command("report", short_help=SHORT_HELP["report"])(report_cmd.report)
app.command("push", short_help=SHORT_HELP["push"])(push_cmd.push)
app.add_typer(config_cmd.app, name="config", short_help=SHORT_HELP["config"])
app.command("env", short_help=SHORT_HELP["env"])(env_cmd.env)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"doge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """doge: raw text to a trained, aligned, evaluated, chatting Doge model."""


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Every user mistake ends in at most two lines on stderr and exit code 2: a :class:`DogeError`
    (bad config, data, path, checkpoint) as ``doge: error: ...``; a usage error Typer finds (unknown
    option, text for a number, missing argument) as that line plus a pointer to ``--help``, instead
    of Typer's boxed usage panel.
    """
    try:
        code = app(args=argv, prog_name="doge", standalone_mode=False)
    except DogeError as err:
        print(f"doge: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.TyperException as err:  # click's ClickException family (usage errors, bad values)
        message = " ".join(err.format_message().split())
        if message:  # empty for a group called without a command: its help was printed already
            print(f"doge: error: {message}", file=sys.stderr)
            ctx = getattr(err, "ctx", None)
            path = ctx.command_path if ctx is not None else "doge"
            print(f"Try '{path} --help' for help.", file=sys.stderr)
        sys.exit(err.exit_code)
    except (typer.Abort, EOFError):
        print("doge: aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("doge: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
