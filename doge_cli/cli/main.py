"""The ``doge`` root command: registers one sub-app per command group and maps user errors
to a one-line message with exit code 2."""

from __future__ import annotations

import sys

import typer

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

app = typer.Typer(
    name="doge",
    help="Train small Doge language models end to end: data, tokenizer, pretraining, SFT, DPO, "
    "GRPO, evaluation and chat. Offline by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# In pipeline order, so `doge --help` reads like the workflow.
app.add_typer(data_cmd.app, name="data")
app.add_typer(train_cmd.app, name="train")
app.command("average")(average_cmd.average)
app.command("upcycle")(upcycle_cmd.upcycle)
app.command("eval")(eval_cmd.eval_models)
app.command("chat")(chat_cmd.chat)
app.command("serve")(serve_cmd.serve)
app.command("report")(report_cmd.report)
app.command("push")(push_cmd.push)
app.add_typer(config_cmd.app, name="config")
app.command("env")(env_cmd.env)


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
        sys.exit(DogeError.exit_code)
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
