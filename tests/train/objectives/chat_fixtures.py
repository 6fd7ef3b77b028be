"""Tiny chat fixtures built in-process: a Doge chat tokenizer, a random tiny start model, and
SFT / DPO / GRPO datasets from the builtin maths generator (no hub, no /tmp/qs)."""

import json

import pytest

MAX_LEN = 96


def chat_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    from doge_cli.chat_format import R1_SYSTEM_PROMPT
    from doge_cli.data.builtin import build_builtin_rows
    from doge_cli.data.tokenizer import _finish, _new_bpe

    rows = build_builtin_rows("math-sft", max_examples=400)
    texts = [m["content"] for r in rows for m in r["messages"]] + [R1_SYSTEM_PROMPT]
    tok = PreTrainedTokenizerFast(tokenizer_object=_new_bpe(400, iter([texts])))
    _finish(tok)
    tok.save_pretrained(path)
    return tok


def start_model(path, tok, seed=0):
    import torch
    from transformers import DogeConfig

    from doge_cli.model import DogeForCausalLM, save_pretrained

    torch.manual_seed(seed)
    config = DogeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                        keep_window_size=512, tie_word_embeddings=True, router_aux_loss_coef=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = DogeForCausalLM(config, attn_implementation="sdpa")
    save_pretrained(model, path, tokenizer=tok)
    return path


def save(dd, path, tok_dir):
    dd.save_to_disk(str(path))
    (path / "manifest.json").write_text(json.dumps({"tokenizer": str(tok_dir)}))
    return path


@pytest.fixture(scope="session")
def chat_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = chat_tokenizer(root / "tokenizer")
    start_model(root / "start", tok)
    return root


@pytest.fixture(scope="session")
def tok(chat_root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_root / "tokenizer")


@pytest.fixture(scope="session")
def sft_data(chat_root, tok):
    import datasets

    from doge_cli.data.builtin import builtin_dataset
    from doge_cli.data.tokenization import tokenize_chat

    raw = builtin_dataset("math-sft", max_examples=360)
    ds = tokenize_chat(raw, tok, MAX_LEN, system=None, pack=False, num_proc=None)
    dd = datasets.DatasetDict({"train": ds.select(range(40, len(ds))), "test": ds.select(range(40))})
    return save(dd, chat_root / "sft", chat_root / "tokenizer")


@pytest.fixture(scope="session")
def dpo_data(chat_root, tok):
    import datasets

    from doge_cli.data.builtin import builtin_dataset
    from doge_cli.data.tokenization import tokenize_dpo

    raw = builtin_dataset("math-dpo", max_examples=360)
    ds = tokenize_dpo(raw, tok, MAX_LEN, system=None, num_proc=None)
    dd = datasets.DatasetDict({"train": ds.select(range(60, len(ds))), "test": ds.select(range(60))})
    return save(dd, chat_root / "dpo", chat_root / "tokenizer")


@pytest.fixture(scope="session")
def grpo_data(chat_root, tok):
    import datasets

    from doge_cli.chat_format import R1_SYSTEM_PROMPT
    from doge_cli.data.builtin import builtin_dataset
    from doge_cli.data.tokenization import prepare_grpo

    raw = builtin_dataset("math-grpo", max_examples=200)
    ds = prepare_grpo(raw, tok, 1024, system=R1_SYSTEM_PROMPT)
    dd = datasets.DatasetDict({"train": ds.select(range(40, len(ds))), "test": ds.select(range(40))})
    return save(dd, chat_root / "grpo", chat_root / "tokenizer")


def overrides(stage_data, out, init, steps=10, **extra):
    over = {
        "data.path": str(stage_data), "data.max_length": MAX_LEN, "output_dir": str(out), "init_from": str(init),
        "train.max_steps": steps, "train.global_batch_size": 8, "runtime.micro_batch_size": 4,
        "runtime.precision": "fp32", "runtime.attn_implementation": "sdpa", "optim.lr": 3e-3,
        "logging.log_every": 1, "logging.eval_every": 0, "logging.eval_batches": 2, "checkpoint.every": 0,
        "schedule.warmup_ratio": 0.1,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def run_stage(stage, data, out, init, *, resume=None, stop_after=None, overwrite=False, steps=10, **extra):
    from doge_cli.config import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives import objective_for

    cfg = resolve_config(stage, hardware="cpu", overrides=overrides(data, out, init, steps=steps, **extra))
    return train(cfg, objective_for(cfg), resume=resume, overwrite=overwrite, stop_after=stop_after)


def built_objective(stage, data, init, tmp_path, **extra):
    """The stage's objective after ``setup()`` (data and tokenizer loaded), without training."""
    from doge_cli.config import resolve_config
    from doge_cli.train.objectives import objective_for

    cfg = resolve_config(stage, hardware="cpu", overrides=overrides(data, tmp_path / "o", init, **extra))
    obj = objective_for(cfg)
    obj.setup()
    return obj


def rows(split, idx):
    """Rows ``idx`` of a dataset split as the dicts the core hands to ``collate`` (with "_row")."""
    part = split[idx]
    return [{**dict(zip(part, vals)), "_row": i} for i, vals in zip(idx, zip(*part.values()))]


def metrics(run_dir):
    from pathlib import Path

    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(folder):
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
