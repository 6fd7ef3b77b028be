"""``doge data train-tokenizer``: a byte-level BPE tokenizer like SmallDoge/Doge-tokenizer, with
Doge's special tokens and chat template (:mod:`doge_cli.chat_format`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from doge_cli.chat_format import BOS, CHAT_TEMPLATE, EOT, PAD, SPECIAL_TOKENS
from doge_cli.errors import DogeError
from doge_cli.io import atomic_dir, check_replaceable

MAX_VOCAB = 262_144  # larger than any LM vocabulary in use; beyond it training the BPE exhausts memory


def corpus_texts(datasets_dir: Path, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of training text from every saved source: pt text (and prompts), chat turns."""
    import datasets

    datasets_dir = Path(datasets_dir)
    found = False
    for stage in ("pt", "sft", "r1", "dpo", "grpo"):
        for folder in sorted((datasets_dir / stage).glob("*/")):
            if not (folder / "state.json").is_file():
                continue
            ds = datasets.load_from_disk(str(folder))
            found = True
            cols = [c for c in ("text", "prompt", "chosen", "rejected", "answer", "messages") if c in ds.column_names]
            for batch in ds.iter(batch_size=batch_size):
                texts: list[str] = []
                for col in cols:
                    for value in batch[col]:
                        if isinstance(value, list):
                            texts.extend(m["content"] for m in value)
                        elif value:
                            texts.append(value)
                yield texts
    if not found:
        raise DogeError(
            f"no datasets under {datasets_dir}; run `doge data download --recipe quickstart --save-dir {datasets_dir}` first"
        )


def _new_bpe(vocab_size: int, texts: Iterator[list[str]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` with one-line errors for a missing path or an offline hub id."""
    from transformers import AutoTokenizer

    from doge_cli.offline import hub_offline

    local = Path(name_or_path)
    if local.exists():
        if not (local / "tokenizer_config.json").is_file() and not (local / "tokenizer.json").is_file():
            raise DogeError(f"{local} is not a tokenizer folder (no tokenizer.json); run `doge data train-tokenizer`")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise DogeError(f"unknown tokenizer {name_or_path!r}: no such folder and not a hub id (owner/name)")
    elif hub_offline():
        raise DogeError(
            f"tokenizer {name_or_path!r} is a hub id but the hub is offline; train one with "
            "`doge data train-tokenizer --out ./tokenizer` and pass --tokenizer ./tokenizer"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise DogeError(f"cannot load tokenizer {name_or_path!r}: {' '.join(str(err).split())[:160]}") from err
    if not getattr(tok, "is_fast", False):
        raise DogeError(f"tokenizer {name_or_path!r} has no fast (Rust) version; doge needs a tokenizer.json")
    return tok


def _finish(tok) -> None:
    """Doge's special tokens, pad/eos and the chat template on a transformers tokenizer."""
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.bos_token, tok.eos_token, tok.pad_token = BOS, EOT, PAD
    if not tok.chat_template or "generation" not in tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1_000_000  # blocks are cut by doge, not by the tokenizer


def train_tokenizer(
    out: Path,
    *,
    datasets_dir: Path,
    vocab_size: int = 32768,
    base: str | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Train a tokenizer on the text under ``datasets_dir`` and save it at ``out``.

    ``base`` (a folder or hub id) retrains that tokenizer's pipeline on the new text
    (``train_new_from_iterator``); otherwise a fresh byte-level BPE is trained. The vocabulary
    is smaller than ``vocab_size`` when the corpus cannot fill it; the real size is returned.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise DogeError("--vocab-size must be at least 300 (256 bytes + special tokens + merges)")
    if vocab_size > MAX_VOCAB:
        raise DogeError(f"--vocab-size {vocab_size:,} is beyond any Doge size (the seed uses 32,768); "
                        f"choose at most {MAX_VOCAB:,}")
    check_replaceable(out, "--out")
    texts = corpus_texts(datasets_dir)
    if base is None:
        tok = PreTrainedTokenizerFast(tokenizer_object=_new_bpe(vocab_size, texts))
    else:
        original = load_tokenizer(base)
        tok = original.train_new_from_iterator(texts, vocab_size=vocab_size)
    _finish(tok)
    out = Path(out)
    with atomic_dir(out, kind="tokenizer") as tmp:
        tok.save_pretrained(str(tmp))
    info = {"vocab_size": len(tok), "requested": vocab_size, "eos": tok.eos_token, "pad": tok.pad_token,
            "bos": tok.bos_token, "path": str(out)}
    log(f"tokenizer saved to {out}: {len(tok):,} tokens (asked for {vocab_size:,})")
    return info


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything that decides token ids: vocab, merges, normalizer, specials, template."""
    import hashlib

    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode("utf-8"))
    h.update(json.dumps([tok.chat_template, tok.bos_token, tok.eos_token, tok.pad_token], default=str).encode())
    return h.hexdigest()[:16]
