"""``doge eval``: lighteval in-process on builtin offline tasks or the seed's hub tasks. Hands off to doge_cli.eval."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from doge_cli.cli.options import DtypeOpt, QuantizeOpt


def eval_models(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="Model folder or hub id; repeat it to evaluate several and show them side by side.",
        show_default=False)] = None,
    tasks: Annotated[list[str] | None, typer.Option(
        "--tasks", "-t", help="Tasks or groups, comma-separated or repeated. Groups: builtin (offline: heldout-ppl, "
        "chatterbot-mc, arithmetic), stages (offline, one figure per training stage: sft-loss, chat-mc, preference, "
        "math-reward; on datasets-dir/merged), base (hellaswag, arc:easy, arc:challenge, piqa, mmlu, triviaqa, winogrande, "
        "openbookqa), instruct (ifeval, bbh), reasoning (math-500, aime24, gpqa-diamond); hub tasks need the hub.",
        show_default="builtin")] = None,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", help="Few-shot examples per prompt "
                                                                   "(perplexity always uses 0).")] = 0,
    datasets_dir: Annotated[Path, typer.Option(
        "--datasets-dir", help="Folder whose eval/ holds the builtin held-out sets "
        "(from `doge data download --recipe quickstart`).")] = Path("./datasets"),
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", help="Write each model's results to DIR/<model>.json.")] = Path("./eval_results"),
    compare: Annotated[list[Path] | None, typer.Option(
        "--compare", help="Results JSON file(s) of earlier runs to show beside the new ones (or alone, "
        "without --model).", show_default=False)] = None,
    max_samples: Annotated[int | None, typer.Option(
        "--max-samples", help="Evaluate only the first N examples of each task (partial, quick numbers).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 8,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template/--no-chat-template", help="Render prompts as chat turns (instruct and R1 models).")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System prompt (with --chat-template).")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="Tokenizer folder or hub id (default: the one in the model folder).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="The model a DPO run started from (e.g. the SFT model): the preference task adds "
        "DPO's implicit-reward accuracy and margin against it.", show_default=False)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", min=1, help="Longest reply of the math-reward task (e.g. the GRPO run's "
        "max_completion_length).", show_default="256, at most half the model's context")] = None,
) -> None:
    """Evaluate models with lighteval and print the results as a table (JSON in --output-dir).

    Offline, the builtin tasks report held-out perplexity next to a unigram baseline, multiple-choice
    accuracy and arithmetic exact match. `--compare a.json b.json` shows earlier results side by side.
    """
    from rich.console import Console

    from doge_cli.chat.loading import check_precision
    from doge_cli.errors import DogeError
    from doge_cli.eval.report import results_table
    from doge_cli.eval.run import check_settings, evaluate, load_results, results_path

    if not model and not compare:
        raise DogeError("give --model PATH (repeatable) to evaluate, or --compare RESULTS.json ... to show results")
    # Everything that can be wrong with the flags is found before the first model is evaluated.
    check_settings(num_fewshot=num_fewshot, max_samples=max_samples, batch_size=batch_size)
    check_precision(dtype, quantize, device)
    from doge_cli.io import check_apart

    for name in model or []:
        check_apart(output_dir, {"model": name, "reference model": reference}, "--output-dir")
        results_path(output_dir, name)
    # A file or pipe gets the 100 columns the table is laid out for (rich would use 80).
    console = Console(highlight=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 100)
    earlier = [load_results(p) for p in compare or []]
    runs = []
    for name in model or []:
        runs.append(evaluate(name, tasks=tasks, num_fewshot=num_fewshot, datasets_dir=datasets_dir,
                             output_dir=output_dir, max_samples=max_samples, batch_size=batch_size,
                             use_chat_template=chat_template, system_prompt=system, tokenizer=tokenizer,
                             device=device, dtype=dtype, quantize=quantize, reference=reference, max_new_tokens=max_new_tokens, log=lambda m: console.print(f"[dim]{m}[/]")))
    console.print(results_table(earlier + runs))
