"""``doge data tokenize``: raw sources of one stage -> model-ready token ids, cached.

Output: ``<datasets_dir>/tokenized/<stage>/<source>/`` with a manifest.json whose ``cache_key`` covers
the tokenizer's fingerprint, every setting and the raw source's manifest; a rerun with the same key is
skipped, any change rebuilds.

- ``pt``:   a token stream in shard folders, 2 bytes a token (see :mod:`doge_cli.data.blocks`); blocks of
            ``max_length`` with positions restarting per document are a view of it. Streamed in batches
            (memory flat in the corpus size), resumable, and splittable across machines (``shard``).

Columns per stage of the others (``save_to_disk``):

- ``sft``/``r1``: ``input_ids``, ``labels`` (-100 outside assistant replies), ``position_ids``;
            one conversation per row, or several per row with ``pack=True`` (positions restart).
            Conversations longer than ``max_length`` are truncated on the right.
- ``dpo``:  ``prompt_input_ids`` (chat template up to the assistant header), ``chosen_input_ids``
            and ``rejected_input_ids`` (the reply + end-of-turn token), TRL's names.
- ``grpo``: ``prompt`` (chat messages: system, user) and ``answer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from doge_cli.chat_format import R1_SYSTEM_PROMPT
from doge_cli.data.arrowio import count_rows
from doge_cli.data.blocks import FORMAT, SHARD_RE, VERSION, shard_name
from doge_cli.data.schema import DATA_STAGES
from doge_cli.data.storage import inputs_untouched, read_manifest, save_dataset
from doge_cli.errors import DogeError

FORMAT_VERSION = 2  # bump when the output of any stage changes (2: pretraining as token streams)
PT_BATCH_DOCS = 4096


def source_dirs(datasets_dir: Path, stage: str, sources: list[str] | None = None) -> list[Path]:
    """The saved raw sources of ``stage`` (optionally only ``sources``), or a DogeError."""
    base = Path(datasets_dir) / stage
    found = sorted(p for p in base.glob("*") if (p / "state.json").is_file())
    if sources:
        names = {p.name for p in found}
        missing = [s for s in sources if s not in names]
        if missing:
            raise DogeError(f"no source {missing[0]!r} under {base}; found: {', '.join(sorted(names)) or 'none'}")
        found = [p for p in found if p.name in sources]
    if not found:
        raise DogeError(
            f"no {stage} data under {base}; run `doge data download --recipe quickstart --save-dir {datasets_dir}`"
        )
    return found


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


# ------------------------------------------------------------------------------- pretraining


def _pt_texts(batch: dict, tok, identity: str | None) -> list[str]:
    if "prompt" not in batch:
        return batch["text"]
    convs = [
        _with_system([{"role": "user", "content": p}, {"role": "assistant", "content": t}], identity)
        for p, t in zip(batch["prompt"], batch["text"])
    ]
    rendered = tok.apply_chat_template(convs, tokenize=False)
    # The template already ends each conversation with the end-of-turn (= EOS) token; the packer
    # appends EOS itself, so drop the rendered one instead of doubling it.
    eos = tok.eos_token
    return [r[: -len(eos)] if eos and r.endswith(eos) else r for r in rendered]


def encode_fast(backend, texts: list[str]) -> list[np.ndarray]:
    """Token ids of ``texts`` with the Rust tokenizer, batched over its threads, no offsets."""
    encs = backend.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encs]


@contextlib.contextmanager
def tokenizer_threads(num_proc: int | None):
    """The Rust tokenizer's batch encoding on ``num_proc`` threads (all cores when None). Its thread pool is
    sized when first used in a process, so a later, different count has no effect there."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    threads = num_proc or available_cores()
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:  # forked workers of later stages must not inherit a forced parallel tokenizer
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_pt_folder(folder: Path) -> None:
    """A tokenized pretraining source folder holds doge's shard folders (finished or partial) and nothing
    else; an older doge's column-format folder may be replaced. Anything else is refused before work."""
    from doge_cli.io import OUTPUT_MARKER, check_replaceable, is_doge_output

    if not folder.exists():
        return
    if (folder / "state.json").is_file() or not folder.is_dir():
        check_replaceable(folder, "tokenized folder")  # the older format (or a foreign file): doge's, or refused
        return
    foreign = [p.name for p in folder.iterdir()
               if p.name != OUTPUT_MARKER and not (p.is_dir() and (SHARD_RE.fullmatch(p.name) or _PARTIAL_RE.fullmatch(p.name))
                                                   and (is_doge_output(p) or (p / PROGRESS).is_file()))]
    if foreign:
        raise DogeError(f"tokenized folder {folder} holds files doge did not write ({foreign[0]}); choose another "
                        "datasets folder or move them (doge replaces only what it created)")


PROGRESS = "progress.json"
_PARTIAL_RE = re.compile(r"\.(shard-\d{5}-of-\d{5})\.(?:partial|old)")


def tokenize_pt_shard(src: Path, out_dir: Path, tok, max_length: int, key: dict, *, shard: tuple[int, int],
                      identity: str | None, num_proc: int | None, progress: bool,
                      log: Callable[[str], None] = lambda _m: None, extra: dict | None = None) -> dict:
    """Tokenize shard ``shard = (i, N)`` of the pretraining source ``src`` into ``out_dir/shard-i-of-N``.

    Raw rows are read a batch at a time and their token stream appended to the shard's files, so memory is
    one batch whatever the corpus. After every batch the progress (rows done, bytes written) is saved: a
    run that was stopped continues from there when run again with the same settings, and ends with the
    files an uninterrupted run writes. Shard folders of other settings or another split of the source are
    removed (they are doge's, and stale); shards of this split that other machines wrote are kept.
    """
    import shutil

    from tqdm.auto import tqdm

    from doge_cli.data.arrowio import iter_batches
    from doge_cli.data.blocks import StreamWriter, new_build_id, shard_name, shard_rows, token_dtype
    from doge_cli.io import OUTPUT_MARKER, is_doge_output, write_json

    index, count = shard
    name = shard_name(index, count)
    final, partial = out_dir / name, out_dir / f".{name}.partial"
    if (out_dir / "state.json").is_file():  # the older column format, checked to be doge's
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / OUTPUT_MARKER).is_file():
        (out_dir / OUTPUT_MARKER).write_text(json.dumps({"kind": "tokenized pretraining source"}) + "\n")
    for old in out_dir.iterdir():  # stale: other settings, or another split of this source
        done_match, partial_match = SHARD_RE.fullmatch(old.name), _PARTIAL_RE.fullmatch(old.name)
        if old in (final, partial) or not (done_match or partial_match):
            continue
        split = (done_match or SHARD_RE.fullmatch(partial_match.group(1))).group(2)
        info = read_manifest(old) if done_match else _read_progress(old)
        if split != f"{count:05d}" or (info or {}).get("cache_key") != key:
            if is_doge_output(old) or (old / PROGRESS).is_file():
                shutil.rmtree(old)
    rows = count_rows(src)
    lo, hi = shard_rows(rows, index, count)
    dtype = token_dtype(len(tok))
    state = _read_progress(partial)
    if state is not None and state.get("cache_key") == key and state.get("rows") == [lo, hi]:
        writer = StreamWriter(partial, dtype, tok.eos_token_id)
        writer.resume(state["stream"])
        done = int(state["rows_done"])
        log(f"pt/{src.name} {name}: resuming after {done:,} of {hi - lo:,} rows")
    else:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        writer = StreamWriter(partial, dtype, tok.eos_token_id)
        done = 0
    backend = tok.backend_tokenizer
    columns = ["text", "prompt"] if "prompt" in _columns(src) else ["text"]
    try:
        with tokenizer_threads(num_proc), tqdm(total=hi - lo, initial=done, unit="doc", desc=f"pt/{src.name}",
                                               disable=not progress) as bar:
            for table in iter_batches(src, PT_BATCH_DOCS, columns=columns, start=lo + done, stop=hi):
                writer.append(encode_fast(backend, _pt_texts(table.to_pydict(), tok, identity)))
                done += table.num_rows
                writer.flush(sync=True)
                write_json(partial / PROGRESS, {"cache_key": key, "rows": [lo, hi], "rows_done": done,
                                                "stream": writer.state()})
                bar.update(table.num_rows)
    finally:
        writer.flush()
    writer.close()
    manifest = {"format": FORMAT, "version": VERSION, "stage": "pt", "source": f"tokenized:{src.name}",
                "shard": [index, count], "rows": [lo, hi], "dtype": dtype.str, "max_length": max_length,
                "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "tokens": writer.tokens,
                "documents": writer.documents, "bytes": (partial / "tokens.bin").stat().st_size
                + (partial / "starts.bin").stat().st_size, "cache_key": key, "build_id": new_build_id(),
                **(extra or {})}
    (partial / PROGRESS).unlink()
    write_json(partial / "manifest.json", manifest)
    (partial / OUTPUT_MARKER).write_text(json.dumps({"kind": "tokenized pretraining shard"}) + "\n")
    if final.exists():  # an earlier run's shard with other settings: replaced only now that this one is whole
        aside = out_dir / f".{name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(partial, final)
        shutil.rmtree(aside)
    else:
        os.replace(partial, final)
    return manifest


def _read_progress(folder: Path) -> dict | None:
    from doge_cli.io import read_json_object

    path = folder / PROGRESS
    return read_json_object(path) if path.is_file() else None


def _columns(folder: Path) -> list[str]:
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    return list(info.get("features", {}))


# ------------------------------------------------------------------------------- chat stages


def _encode_chats(batch: dict, tok, max_length: int, system: str | None) -> dict:
    convs = [_with_system(m, system) for m in batch["messages"]]
    out = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids_out, labels_out, pos_out = [], [], []
    for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
        ids, mask = ids[:max_length], mask[:max_length]
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        if all(lab == -100 for lab in labels):
            continue  # nothing to learn from (no assistant reply, or it was truncated away)
        ids_out.append(ids)
        labels_out.append(labels)
        pos_out.append(list(range(len(ids))))
    return {"input_ids": ids_out, "labels": labels_out, "position_ids": pos_out}


def pack_rows(ds, max_length: int):
    """Greedily put consecutive conversations in one row up to ``max_length``; positions restart."""
    import datasets

    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    cur: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for batch in ds.iter(batch_size=1000):
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_length:
                for k in rows:
                    rows[k].append(cur[k])
                cur = {"input_ids": [], "labels": [], "position_ids": []}
            cur["input_ids"] += ids
            cur["labels"] += labels
            cur["position_ids"] += pos
    if cur["input_ids"]:
        for k in rows:
            rows[k].append(cur[k])
    return datasets.Dataset.from_dict(rows)


def tokenize_chat(raw, tok, max_length: int, *, system: str | None, pack: bool, num_proc: int | None):
    """SFT / R1: assistant-only labels from the chat template's generation spans."""
    ds = raw.map(
        _encode_chats, batched=True, batch_size=256, remove_columns=raw.column_names, num_proc=num_proc,
        fn_kwargs={"tok": tok, "max_length": max_length, "system": system}, desc="tokenizing conversations",
    )
    return pack_rows(ds, max_length) if pack else ds


def _encode_dpo(batch: dict, tok, max_length: int, system: str | None) -> dict:
    prompts = tok.apply_chat_template([_with_system(p, system) for p in batch["prompt"]], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
    eot = tok.eos_token_id
    # The template trims reply text, so do the same to match what SFT would see.
    chosen = tok([c.strip() for c in batch["chosen"]], add_special_tokens=False)["input_ids"]
    rejected = tok([r.strip() for r in batch["rejected"]], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    for p, c, r in zip(prompts, chosen, rejected):
        c, r = c + [eot], r + [eot]
        # Long prompts keep their end (the question), replies keep their start.
        if len(p) + max(len(c), len(r)) > max_length:
            p = p[-(max_length // 2):]
            c, r = c[: max_length - len(p)], r[: max_length - len(p)]
        out["prompt_input_ids"].append(p)
        out["chosen_input_ids"].append(c)
        out["rejected_input_ids"].append(r)
    return out


def tokenize_dpo(raw, tok, max_length: int, *, system: str | None, num_proc: int | None):
    """DPO: prompt / chosen / rejected ids in TRL's column names."""
    return raw.map(
        _encode_dpo, batched=True, batch_size=256, remove_columns=raw.column_names, num_proc=num_proc,
        fn_kwargs={"tok": tok, "max_length": max_length, "system": system}, desc="tokenizing pairs",
    )


def prepare_grpo(raw, tok, max_length: int, *, system: str | None):
    """GRPO: chat-message prompts plus exact answers; prompts longer than half the budget are dropped
    so there is room to generate."""
    def fn(batch):
        prompts = [_with_system([{"role": "user", "content": p}], system) for p in batch["prompt"]]
        lengths = [len(ids) for ids in tok.apply_chat_template(
            prompts, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]]
        keep = [n <= max_length // 2 for n in lengths]
        return {"prompt": [p for p, k in zip(prompts, keep) if k],
                "answer": [a for a, k in zip(batch["answer"], keep) if k]}

    return raw.map(fn, batched=True, remove_columns=raw.column_names, desc="preparing prompts")


# ------------------------------------------------------------------------------- driver


MAX_LENGTH_LIMIT = 1 << 20  # tokens per row; far beyond any Doge context (the seed uses 2,048)
PROBE_ROWS = 256  # rows tokenized per source before anything is written, to catch an empty result early


def check_max_length(max_length: int) -> None:
    if max_length < 16:
        raise DogeError("--max-length must be at least 16")
    if max_length > MAX_LENGTH_LIMIT:
        raise DogeError(f"--max-length {max_length:,} is beyond any Doge context; choose at most {MAX_LENGTH_LIMIT:,} "
                        "(the seed uses 2048)")


def load_data_tokenizer(tokenizer: str):
    """The tokenizer for ``doge data tokenize``: it needs distinct pad and eos tokens and a chat template."""
    from doge_cli.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.pad_token_id is None or tok.eos_token_id is None or not tok.chat_template:
        raise DogeError(f"tokenizer {tokenizer!r} lacks a pad token, an eos token or a chat template; "
                        "use one made by `doge data train-tokenizer`")
    return tok


def _tokenize(stage: str, raw, tok, max_length: int, *, system, identity, pack, num_proc, progress):
    if stage in ("sft", "r1"):
        return tokenize_chat(raw, tok, max_length, system=system, pack=pack, num_proc=num_proc)
    if stage == "dpo":
        return tokenize_dpo(raw, tok, max_length, system=system, num_proc=num_proc)
    return prepare_grpo(raw, tok, max_length, system=system)


def _empty_result_error(stage: str, name: str, max_length: int) -> DogeError:
    return DogeError(f"{stage}/{name}: nothing left after tokenizing (every row was dropped: no assistant reply "
                     f"or a prompt too long within --max-length {max_length}); raise --max-length")


def tokenize_stages(
    tokenizer: str,
    datasets_dir: Path,
    stages: list[str],
    max_length: int,
    *,
    sources: list[str] | None = None,
    pack: bool = False,
    identity: str | None = None,
    num_proc: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> list[dict]:
    """Tokenize every source of every stage in ``stages``, after checking all of them first.

    Pretraining sources are written as token streams (:mod:`doge_cli.data.blocks`): ``shard = (i, N)``
    tokenizes the i-th of N contiguous parts of each source's rows, so N machines can share a corpus;
    ``num_proc`` is the tokenizer's thread count (default: every core). A pretraining source that was
    stopped part-way resumes where it stopped.

    Everything a user can get wrong is found before the first source is written: unknown stages or
    sources, a bad ``max_length``, the tokenizer, destinations doge may not replace, and a source
    whose rows would all be dropped (found by tokenizing its first rows, and all of them when those
    give nothing). Returns one manifest per source (``cached`` says it was reused). The source folders
    are only read (see ``storage.inputs_untouched``).
    """

    unknown = [s for s in stages if s not in DATA_STAGES]
    if unknown:
        raise DogeError(f"unknown stage {unknown[0]!r}; choose from: {', '.join(DATA_STAGES)}")
    check_max_length(max_length)
    if num_proc is not None and num_proc < 1:
        raise DogeError("--num-proc must be at least 1")
    if tuple(shard) != (0, 1) and any(s != "pt" for s in stages):
        raise DogeError("--shard splits pretraining sources across machines; tokenize the other stages (small enough "
                        "for one machine) without it, e.g. --stage pt --shard 0/4")
    with inputs_untouched():
        return _tokenize_stages(tokenizer, datasets_dir, stages, max_length, sources=sources, pack=pack,
                                identity=identity, num_proc=num_proc, shard=tuple(shard), progress=progress, log=log)


def _tokenize_stages(tokenizer, datasets_dir, stages, max_length, *, sources, pack, identity, num_proc, shard,
                     progress, log) -> list[dict]:
    import datasets

    from doge_cli.data.tokenizer import tokenizer_fingerprint
    from doge_cli.io import check_replaceable

    plan = {stage: source_dirs(datasets_dir, stage, sources) for stage in stages}
    tok = load_data_tokenizer(tokenizer)
    fingerprint = tokenizer_fingerprint(tok)
    jobs = []
    for stage, dirs in plan.items():
        system = R1_SYSTEM_PROMPT if stage in ("r1", "grpo") else identity
        for src in dirs:
            out_dir = Path(datasets_dir) / "tokenized" / stage / src.name
            key = {
                "format": FORMAT_VERSION, "tokenizer": fingerprint, "stage": stage, "max_length": max_length,
                "pack": pack, "identity": identity, "system": system, "raw": read_manifest(src),
            }
            if stage == "pt":
                key.pop("pack")
                old = read_manifest(out_dir / shard_name(*shard))
                cached = old is not None and old.get("cache_key") == key
                if not cached:
                    check_pt_folder(out_dir)
                    if count_rows(src) == 0:
                        raise DogeError(f"{src} is empty; download it again")
                jobs.append((stage, src, out_dir, key, old if cached else None, system))
                continue
            old = read_manifest(out_dir)
            cached = old is not None and old.get("cache_key") == key
            if not cached:
                check_replaceable(out_dir, "tokenized folder")
                raw = datasets.load_from_disk(str(src))
                if len(raw) == 0:
                    raise DogeError(f"{src} is empty; download it again")
                kwargs = {"system": system, "identity": identity, "pack": False, "num_proc": None, "progress": False}
                probe = _tokenize(stage, raw.select(range(min(PROBE_ROWS, len(raw)))), tok, max_length, **kwargs)
                if len(probe) == 0 and (len(raw) <= PROBE_ROWS or len(_tokenize(stage, raw, tok, max_length,
                                                                                 **kwargs)) == 0):
                    raise _empty_result_error(stage, src.name, max_length)
            jobs.append((stage, src, out_dir, key, old if cached else None, system))
    results = []
    for stage, src, out_dir, key, old, system in jobs:
        if old is not None:
            what = f"{old['tokens']:,} tokens" if stage == "pt" else f"{old['rows']:,} rows"
            log(f"{stage}/{src.name}: cached ({what})")
            results.append({**old, "cached": True})
            continue
        if stage == "pt":
            manifest = tokenize_pt_shard(src, out_dir, tok, max_length, key, shard=shard, identity=identity,
                                         num_proc=num_proc, progress=progress, log=log,
                                         extra={"tokenizer": _portable(tokenizer), "tokenizer_fingerprint": fingerprint})
            lo, hi = manifest["rows"]
            log(f"pt/{src.name} {shard_name(*shard)}: {hi - lo:,} rows, {manifest['tokens']:,} tokens, "
                f"{manifest['bytes'] / manifest['tokens']:.3f} bytes a token")
            results.append({**manifest, "cached": False})
            continue
        raw = datasets.load_from_disk(str(src))
        ds = _tokenize(stage, raw, tok, max_length, system=system, identity=identity, pack=pack, num_proc=num_proc,
                       progress=progress)
        if len(ds) == 0:  # pragma: no cover - the probe above found a row that survives
            raise _empty_result_error(stage, src.name, max_length)
        tokens = _count_tokens(ds)
        manifest = save_dataset(
            ds, out_dir, stage=stage, source=f"tokenized:{src.name}",
            extra={"cache_key": key, "tokenizer": _portable(tokenizer), "tokenizer_fingerprint": fingerprint,
                   "tokens": tokens, "max_length": max_length},
        )
        log(f"{stage}/{src.name}: {manifest['rows']:,} rows, {tokens:,} tokens")
        results.append({**manifest, "cached": False})
    return results


def tokenize_stage(tokenizer: str, datasets_dir: Path, stage: str, max_length: int, **kwargs) -> list[dict]:
    """:func:`tokenize_stages` for one stage."""
    return tokenize_stages(tokenizer, datasets_dir, [stage], max_length, **kwargs)


def _portable(tokenizer: str) -> str:
    """A local tokenizer folder as an absolute path, so training finds it from any working directory."""
    return str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer


def _count_tokens(ds) -> int:
    import pyarrow.compute as pc

    for col in ("input_ids", "chosen_input_ids"):
        if col in ds.column_names:
            return int(pc.sum(pc.list_value_length(ds.data.column(col))).as_py() or 0)
    return 0


