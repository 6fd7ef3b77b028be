"""Tiny tokenizer + packed pretraining data built in-process (no hub, no doge data dependency)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK = 64


def _texts():
    from pydoc_data.topics import topics

    return [t for t in topics.values() if len(t) > 200][:120]


def make_tokenizer(path, vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>",
                                                                       "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(path)
    return fast


def make_pt_dataset(path, tokenizer, block=BLOCK, n_test_blocks=8):
    from datasets import Dataset, DatasetDict

    ids, pos = [], []
    for text in _texts():
        doc = tokenizer(text)["input_ids"][: block * 3] + [tokenizer.eos_token_id]
        ids.extend(doc)
        pos.extend(range(len(doc)))
    rows = {"input_ids": [], "position_ids": []}
    for start in range(0, len(ids) - block + 1, block):
        chunk_pos = pos[start:start + block]
        base = chunk_pos[0]
        # positions restart at each block start, then at each document start
        fixed, cur = [], 0
        for i, p in enumerate(chunk_pos):
            cur = 0 if (i == 0 or p == 0) else cur + 1
            fixed.append(cur)
        del base
        rows["input_ids"].append(ids[start:start + block])
        rows["position_ids"].append(fixed)
    data = Dataset.from_dict(rows)
    dd = DatasetDict({"train": data.select(range(n_test_blocks, len(data))), "test": data.select(range(n_test_blocks))})
    dd.save_to_disk(str(path))
    (path / "manifest.json").write_text(json.dumps({"tokenizer": str(path.parent / "tokenizer")}))
    return dd


@pytest.fixture(scope="session")
def pt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptdata")
    tok = make_tokenizer(root / "tokenizer")
    make_pt_dataset(root / "merged_pt", tok)
    return root / "merged_pt"


@pytest.fixture(scope="session")
def pt_stream_data(tmp_path_factory):
    """The same texts through doge's own pipeline: a tokenizer from `doge data train-tokenizer`, the 2-byte
    token stream of `doge data tokenize`, and the block index of `doge data merge`."""
    from datasets import Dataset

    from doge_cli.data.merge import merge_stage
    from doge_cli.data.tokenization import tokenize_stages
    from doge_cli.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ptstream")
    ds = root / "datasets"
    Dataset.from_dict({"text": _texts()}).save_to_disk(str(ds / "pt" / "docs"))
    train_tokenizer(root / "tokenizer", datasets_dir=ds, vocab_size=320)
    tokenize_stages(str(root / "tokenizer"), ds, ["pt"], BLOCK, progress=False)
    merge_stage(ds, "pt", train_examples=None, test_examples=8, seed=233)
    return ds / "merged" / "pt"


@pytest.fixture(params=["columns", "stream"])
def pt_any(request):
    """Pretraining data in both formats training reads: a DatasetDict of int32 columns (the former format,
    and what a user's own dataset looks like) and doge's token stream with its block index."""
    return request.getfixturevalue("pt_data" if request.param == "columns" else "pt_stream_data")


def tiny_overrides(data_path, out, steps=20, **extra):
    over = {
        "data.path": str(data_path), "data.max_length": BLOCK, "output_dir": str(out),
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 2, "model.num_key_value_heads": 1, "model.max_position_embeddings": BLOCK,
        "model.keep_window_size": BLOCK, "train.max_steps": steps, "train.global_batch_size": 4,
        "runtime.micro_batch_size": 2, "runtime.precision": "fp32", "runtime.attn_implementation": "sdpa",
        "optim.lr": 3e-3, "logging.log_every": 1, "logging.eval_every": 0, "logging.eval_batches": 2,
        "checkpoint.every": 0, "schedule.warmup_ratio": 0.1,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


ROOT = Path(__file__).resolve().parents[2]


def launch_train(stage, overrides, out, accelerate_config=None):
    """``python -m doge_cli train STAGE`` in a subprocess (optionally under an accelerate launcher from
    configs/accelerate/); returns its stdout and the records of ``out/metrics.jsonl``."""
    env = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "doge_cli", "train", stage, "--hardware", "cpu", *overrides]
    if accelerate_config:
        args += ["--accelerate-config", str(ROOT / "configs" / "accelerate" / accelerate_config)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
