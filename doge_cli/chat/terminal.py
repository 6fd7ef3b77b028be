"""The terminal side of ``doge chat``: an interactive loop with slash commands, and a one-shot mode.

Interactive replies stream as they are generated; an R1 model's reasoning is shown dim and italic
under a "thinking" label, its answer in plain text. One-shot mode (``--prompt`` or piped stdin)
prints only the answer, so scripts can use the output as is.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from rich.console import Console

from doge_cli.chat.session import ChatSession
from doge_cli.chat_format import ReasoningStream, split_reasoning
from doge_cli.errors import DogeError

HELP = (
    "/reset            forget the conversation (the system prompt stays)\n"
    "/system TEXT      set the system prompt (/system alone removes it)\n"
    "/params           show the sampling settings; /params temperature=0.5 greedy=true sets them\n"
    "/save FILE        write the conversation as JSON\n"
    "/exit             leave (Ctrl-D too)"
)
THINKING_STYLE = "dim italic"


def answer_once(session: ChatSession, prompt: str) -> str:
    """The answer to one prompt (reasoning sections removed), for scripts."""
    return split_reasoning(session.reply(prompt))[1]


def _stream_reply(session: ChatSession, text: str, console: Console) -> None:
    stream = ReasoningStream()
    shown = {"kind": None}

    def show(pieces: list[tuple[str, str]]) -> None:
        for kind, piece in pieces:
            if kind != shown["kind"]:
                if shown["kind"] is not None:
                    console.print()
                label = "thinking" if kind == "thinking" else "doge"
                console.print(f"[bold {'magenta' if kind == 'thinking' else 'cyan'}]{label}>[/] ", end="")
                shown["kind"] = kind
                piece = piece.lstrip()
            console.print(piece, end="", style=THINKING_STYLE if kind == "thinking" else None, markup=False,
                          highlight=False, soft_wrap=True)

    session.reply(text, on_text=lambda chunk: show(stream.feed(chunk)))
    show(stream.flush())
    if shown["kind"] is None:
        console.print("[bold cyan]doge>[/] [dim](empty reply)[/]", end="")
    console.print()
    if session.dropped_turns:
        console.print(f"[dim](the {session.dropped_turns} oldest turns were left out to fit the context window)[/]")


def _show_params(session: ChatSession, console: Console) -> None:
    values = "  ".join(f"{k}={v}" for k, v in session.params.as_dict().items())
    console.print(f"[dim]{values}[/]", highlight=False)


def handle_command(session: ChatSession, line: str, console: Console) -> bool:
    """Run one slash command; False means leave the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        console.print("[dim]conversation cleared[/]")
    elif name == "/system":
        session.set_system(arg or None)
        console.print(f"[dim]system prompt {'set' if session.system else 'removed'}[/]")
    elif name == "/params":
        for item in shlex.split(arg):
            key, eq, value = item.partition("=")
            if not eq:
                raise DogeError(f"write /params key=value, e.g. /params temperature=0.5 (got {item!r})")
            session.params.set(key.strip(), value.strip())
        _show_params(session, console)
    elif name == "/save":
        if not arg:
            raise DogeError("give a file name: /save chat.json")
        path = session.save(arg)
        console.print(f"[dim]saved to {path}[/]", highlight=False)
    elif name == "/help":
        console.print(HELP, markup=False, highlight=False)
    else:
        raise DogeError(f"unknown command {name}; /help lists the commands")
    return True


def run_interactive(session: ChatSession, console: Console, read: Callable[[str], str] | None = None) -> None:
    """Read turns until /exit or end of input; Ctrl-C during a reply abandons that reply only."""
    read = read or (lambda prompt: console.input(prompt))
    console.print(f"[bold]doge chat[/] with {session.model_name} — /help for commands, /exit to leave",
                  highlight=False)
    if session.system:
        console.print(f"[dim]system: {session.system}[/]", highlight=False)
    while True:
        try:
            line = read("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not handle_command(session, line, console):
                    return
            except DogeError as err:
                console.print(f"[red]error:[/] {err}", highlight=False)
            continue
        try:
            _stream_reply(session, line, console)
        except KeyboardInterrupt:
            console.print("\n[dim](reply interrupted; the turn was not kept)[/]")
