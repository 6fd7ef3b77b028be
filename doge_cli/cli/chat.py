"""``doge chat``: streaming multi-turn chat in the terminal. The body hands off to doge_cli.chat."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from doge_cli.cli.options import DtypeOpt, QuantizeOpt


def chat(
    model: Annotated[str, typer.Argument(help="Model folder (e.g. runs/sft/final) or hub id (owner/name).",
                                         show_default=False)],
    system: Annotated[str | None, typer.Option("--system", help="System prompt for the conversation.")] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="Answer this one prompt, print only the answer and exit (for scripts). "
        "Without it, a non-terminal stdin is read as the one prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest reply, in tokens.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens "
                                                         "reaching this probability.")] = 0.9,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0: all).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", help="Penalise tokens already seen (1.0: off).")] = 1.0,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always take the likeliest token (no sampling).")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed, for repeatable replies.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="Tokenizer folder or hub id (default: the one in the model folder).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
) -> None:
    """Chat with a model through its chat template. Commands: /reset, /system TEXT, /params \\[key=value ...],
    /save FILE, /exit. Reasoning of R1 models is shown dim under "thinking"."""
    from rich.console import Console

    from doge_cli.chat.loading import load_model_and_tokenizer
    from doge_cli.chat.session import ChatSession
    from doge_cli.chat.terminal import answer_once, run_interactive
    from doge_cli.inference import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, greedy=greedy, seed=seed)
    params.validate()
    lm, tok = load_model_and_tokenizer(model, tokenizer=tokenizer, device=device, need_chat_template=True,
                                       dtype=dtype, quantize=quantize)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            from doge_cli.errors import DogeError

            raise DogeError("stdin is not a terminal and gave no prompt; pipe a prompt in, use --prompt TEXT, "
                            "or run doge chat in a terminal")
    session = ChatSession(lm, tok, system=system, params=params, model_name=model)
    if prompt is not None:
        typer.echo(answer_once(session, prompt))
        return
    run_interactive(session, Console(highlight=False))
