"""``doge data``: download, train-tokenizer, tokenize and merge. Bodies hand off to doge_cli.data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Get data (hub, builtin offline, local files), train a tokenizer, tokenize per stage, merge.",
    no_args_is_help=True,
)

DatasetsDir = Annotated[Path, typer.Option("--datasets-dir", help="Folder holding the downloaded datasets.")]
Stage = Annotated[str, typer.Option("--stage", help="Training stage: pt, sft, dpo, grpo or r1.")]


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()  # our own lines say what happened; its bars only add noise


@app.command("download")
def data_download(
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="pretrain, sft, dpo, r1, grpo (hub) or quickstart (builtin, offline).")] = None,
    save_dir: Annotated[Path, typer.Option("--save-dir", help="Where to save the datasets.")] = Path("./datasets"),
    source: Annotated[list[str] | None, typer.Option(
        "--source", help="Only this source of the recipe (repeatable).")] = None,
    max_examples: Annotated[int | None, typer.Option(
        "--max-examples", help="Take only the first N rows of each source (streams from the hub).")] = None,
    streaming: Annotated[bool, typer.Option(
        "--streaming", help="Stream from the hub in resumable shards instead of a full download.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None,
    hub_mirror: Annotated[Path | None, typer.Option(
        "--hub-mirror", help="Read hub datasets from DIR/<owner>/<name> instead of the hub.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the builtin generated sources.")] = 233,
    local: Annotated[Path | None, typer.Option(
        "--local", help="Import local jsonl/json/parquet/csv/txt files (a file or folder) instead of a recipe.")] = None,
    stage: Annotated[str, typer.Option("--stage", help="With --local: the stage the files are for.")] = "pt",
    name: Annotated[str | None, typer.Option("--name", help="With --local: the source name (default: file name).")] = None,
    text_field: Annotated[str | None, typer.Option("--text-field", help="Column holding the text (pt).")] = None,
    messages_field: Annotated[str | None, typer.Option(
        "--messages-field", help="Column holding chat messages (sft, r1).")] = None,
    prompt_field: Annotated[str | None, typer.Option("--prompt-field", help="Column holding the prompt.")] = None,
    chosen_field: Annotated[str | None, typer.Option("--chosen-field", help="Column holding the chosen reply (dpo).")] = None,
    rejected_field: Annotated[str | None, typer.Option(
        "--rejected-field", help="Column holding the rejected reply (dpo).")] = None,
    answer_field: Annotated[str | None, typer.Option(
        "--answer-field", help="Column holding the answer (grpo; sft with --prompt-field).")] = None,
) -> None:
    """Download a recipe's datasets, build the builtin ones, or import local files."""
    from doge_cli.data.download import download_recipe, import_local
    from doge_cli.errors import DogeError

    _quiet()
    if local is not None:
        fields = {"text": text_field, "messages": messages_field, "prompt": prompt_field, "chosen": chosen_field,
                  "rejected": rejected_field, "answer": answer_field}
        import_local(local, save_dir, stage=stage, name=name, fields=fields, max_examples=max_examples,
                     log=typer.echo)
        return
    if recipe is None:
        raise DogeError("give --recipe (pretrain, sft, dpo, r1, grpo or quickstart) or --local PATH")
    download_recipe(recipe, save_dir, sources=source, max_examples=max_examples, streaming=streaming,
                    revision=revision, hub_mirror=hub_mirror, seed=seed, log=typer.echo)


@app.command("train-tokenizer")
def data_train_tokenizer(
    out: Annotated[Path, typer.Option("--out", help="Folder to save the tokenizer in.")] = Path("./tokenizer"),
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Target vocabulary size (smaller if the corpus "
                                                                 "cannot fill it).")] = 32768,
    base: Annotated[str | None, typer.Option(
        "--from", help="Retrain this tokenizer's pipeline (folder or hub id) instead of a fresh BPE.")] = None,
    datasets_dir: DatasetsDir = Path("./datasets"),
) -> None:
    """Train a byte-level BPE tokenizer with Doge's special tokens and chat template."""
    from doge_cli.data.tokenizer import train_tokenizer

    _quiet()
    train_tokenizer(out, datasets_dir=datasets_dir, vocab_size=vocab_size, base=base, log=typer.echo)


@app.command("tokenize")
def data_tokenize(
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="Tokenizer folder or hub id.")] = "./tokenizer",
    datasets_dir: DatasetsDir = Path("./datasets"),
    max_length: Annotated[int, typer.Option("--max-length", help="Block length (pt) / longest row.")] = 2048,
    stage: Annotated[list[str] | None, typer.Option(
        "--stage", help="Stage(s) to tokenize: pt, sft, dpo, grpo, r1 (repeatable; default: those present).")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", help="Only this source (repeatable).")] = None,
    pack: Annotated[bool, typer.Option("--pack", help="SFT/R1: several conversations per row.")] = False,
    identity: Annotated[str | None, typer.Option(
        "--identity", help="System turn added to rendered conversations, e.g. 'You are Doge, ...'.")] = None,
    num_proc: Annotated[int | None, typer.Option(
        "--num-proc", help="Tokenizer threads (pt) or worker processes (chat stages); default: every core.")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="pt only: tokenize part I of N of each source (I/N, 0 <= I < N), one per machine; "
                        "`doge data merge` then reads all N.")] = None,
) -> None:
    """Tokenize each stage's sources into <datasets-dir>/tokenized/<stage>/<source>/ (cached; pt resumes)."""
    from doge_cli.data.schema import DATA_STAGES
    from doge_cli.data.tokenization import tokenize_stages
    from doge_cli.errors import DogeError

    _quiet()
    stages = stage or (["pt"] if shard is not None else [s for s in DATA_STAGES if (datasets_dir / s).is_dir()])
    if not stages:
        raise DogeError(f"no stage folders under {datasets_dir}; run `doge data download` first")
    from doge_cli.data.blocks import parse_shard

    split = parse_shard(shard) if shard is not None else (0, 1)
    tokenize_stages(tokenizer, datasets_dir, stages, max_length, sources=source, pack=pack, identity=identity,
                    num_proc=num_proc, shard=split, log=typer.echo)


@app.command("merge")
def data_merge(
    datasets_dir: DatasetsDir = Path("./datasets"),
    stage: Stage = "pt",
    train_examples: Annotated[int | None, typer.Option(
        "--train-examples", help="Rows in train (default: all the mixture allows without repeats).")] = None,
    test_examples: Annotated[int, typer.Option("--test-examples", help="Rows in the test split.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle and sampling seed.")] = 233,
    ratio: Annotated[list[str] | None, typer.Option(
        "--ratio", help="Mixture weight name=weight (repeatable); unnamed sources are left out.")] = None,
) -> None:
    """Mix the tokenized sources of a stage by ratio into <datasets-dir>/merged/<stage>/ (train + test)."""
    from doge_cli.data.merge import merge_stage, parse_ratios

    _quiet()
    merge_stage(datasets_dir, stage, train_examples=train_examples, test_examples=test_examples, seed=seed,
                ratios=parse_ratios(ratio), log=typer.echo)
