"""Loading what a stage trains on: the merged dataset, the tokenizer and the start model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from doge_cli.chat_format import config_eos
from doge_cli.data.schema import TRAINED_BY
from doge_cli.errors import DogeError
from doge_cli.train.objectives.lm import unwrap


def load_dataset_dict(path: str, stage: str):
    """Open a dataset folder written by ``doge data merge`` with a one-line error when it is not there."""
    from datasets import DatasetDict, load_from_disk

    p = Path(path)
    hint = (f"make it with 'doge data download --recipe quickstart && doge data tokenize ... && "
            f"doge data merge --stage {stage}' or set data.path")
    if not p.exists():
        raise DogeError(f"no dataset at {p}; {hint}")
    from doge_cli.data.blocks import open_merged

    blocks = open_merged(p)  # pretraining merged as a block index over the tokenized sources
    if blocks is not None:
        if TRAINED_BY.get("pt") != stage:
            raise DogeError(f"dataset {p} was made for stage pt ('doge data merge --stage pt'), not for {stage}; "
                            f"point data.path at the merged {stage} data (e.g. ./datasets/merged/{stage})")
        if "train" not in blocks or len(blocks["train"]) == 0:
            raise DogeError(f"dataset {p} has no (or an empty) train split; {hint}")
        return blocks
    try:
        data = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise DogeError(f"{p} is not a saved dataset ({type(err).__name__}); {hint}") from None
    made_for = _stage_of(p)
    if made_for is not None and TRAINED_BY.get(made_for) != stage:
        raise DogeError(f"dataset {p} was made for stage {made_for} ('doge data merge --stage {made_for}'), not for "
                        f"{stage}; point data.path at the merged {stage} data (e.g. ./datasets/merged/{stage})")
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    if "train" not in data or len(data["train"]) == 0:
        raise DogeError(f"dataset {p} has no (or an empty) train split; {hint}")
    return data


def require_columns(splits: dict, path: str, columns: tuple[str, ...], stage: str, need: str) -> None:
    """Every split given (None: absent) has ``columns``; else one line naming the first split that lacks
    some, what the stage needs (``need``) and the command that builds such data."""
    for name, split in splits.items():
        if split is None:
            continue
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DogeError(f"the {name} split of {path} has no {' or '.join(repr(c) for c in missing)} column "
                            f"(columns: {', '.join(split.column_names)}); {need}: build it with "
                            f"'doge data tokenize --stage {stage}'")


def load_splits(config, columns: tuple[str, ...], need: str, *, start_model: bool, with_eval: bool = True):
    """``(train, eval or None)`` of the stage's merged dataset, with ``columns`` checked in both. For a stage
    that starts from a model (``start_model``) the model must be named first, before anything is loaded."""
    if start_model:
        require_init_from(config)
    data = load_dataset_dict(config.data.path, config.stage)
    train = data["train"]
    evaluation = data.get(config.data.eval_split) if with_eval else None
    require_columns({"train": train, config.data.eval_split: evaluation}, config.data.path, columns, config.stage,
                    need)
    return train, evaluation


def _stage_of(path: Path) -> str | None:
    """The stage ``doge data merge`` recorded for a dataset folder, if any."""
    from doge_cli.io import read_json_object

    manifest = read_json_object(path / "manifest.json") if (path / "manifest.json").is_file() else None
    stage = (manifest or {}).get("stage")
    return stage if isinstance(stage, str) else None


def load_tokenizer(path_or_id: str | None, fallback_dirs: list[Path]):
    """The tokenizer named by the config, else the first folder in ``fallback_dirs`` that has one, loaded
    by the one tokenizer loader (``doge_cli.data.tokenizer.load_tokenizer``)."""
    from doge_cli.data.tokenizer import load_tokenizer as load

    candidates = [path_or_id] if path_or_id else [str(d) for d in fallback_dirs if (Path(d) / "tokenizer_config.json").exists()]
    if not candidates:
        raise DogeError("no tokenizer found; set data.tokenizer=PATH (a folder from 'doge data train-tokenizer') "
                        "or tokenize the data with 'doge data tokenize', which records it")
    return load(candidates[0])


def tokenizer_from_manifest(data_path: str) -> str | None:
    """The tokenizer that ``doge data`` recorded for a dataset folder, if any."""
    manifest = Path(data_path) / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer")
        except json.JSONDecodeError:
            return None
    return None


def require_init_from(config) -> str:
    if not config.init_from:
        raise DogeError(f"{config.stage} needs a model to start from; pass --model PATH|HUB_ID (or set init_from "
                        "in the recipe), e.g. the final/ folder of the previous stage")
    return config.init_from


def chat_tokenizer(config):
    """The tokenizer saved with the final model: data.tokenizer, else the one ``doge data`` recorded,
    else the start model's. It must have a chat template, since chat and GRPO render prompts with it."""
    init = require_init_from(config)
    recorded = tokenizer_from_manifest(config.data.path)
    tok = load_tokenizer(config.data.tokenizer or recorded, [Path(init)])
    if not tok.chat_template:
        raise DogeError(f"the tokenizer of {config.stage} has no chat template; use one made by "
                        "'doge data train-tokenizer' (or set data.tokenizer to such a folder)")
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise DogeError("the tokenizer lacks a pad or an eos token; use one made by 'doge data train-tokenizer'")
    return tok


def load_start_model(config, tokenizer):
    """The model to fine-tune, with eos (incl. end-of-turn) and pad ids from the chat tokenizer so the
    exported generation_config stops after one reply."""
    from doge_cli.model import load_model

    init = require_init_from(config)
    # fp32 master weights whatever the checkpoint's dtype (hub models are often bf16): mixed precision
    # comes from autocast (runtime.precision), as in pretraining; bf16 weights would lose small updates.
    model = load_model(init, attn_implementation=config.runtime.attn_implementation, allow_legacy=False,
                       dtype=torch.float32)
    vocab = len(tokenizer)
    if model.config.vocab_size < vocab:
        raise DogeError(f"the tokenizer has {vocab} tokens but model {init} has a vocabulary of "
                        f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    model.config.eos_token_id = config_eos(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id
    return model.train()


def frozen_copy(model: torch.nn.Module, accelerator, instead: str) -> torch.nn.Module:
    """A reference model: the start weights, no gradients, eval mode, same device.

    Under ZeRO-3 or FSDP the prepared model holds only this process's shard of each weight, so a copy
    would be no model at all: refused in one line, naming the setting that needs no reference model.
    """
    import copy

    from doge_cli.train.collective import gathers_weights_in_forward

    if gathers_weights_in_forward(accelerator):
        raise DogeError(f"a frozen reference model is not supported under DeepSpeed ZeRO-3 or FSDP (each process "
                        f"holds only a shard of the weights); use {instead}, or ZeRO-2 / DDP")

    ref = copy.deepcopy(unwrap(model))
    ref.requires_grad_(False)
    return ref.eval()
