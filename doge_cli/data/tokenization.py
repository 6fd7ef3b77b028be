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
import functools
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from doge_cli.chat_format import R1_SYSTEM_PROMPT
from doge_cli.data.arrowio import count_rows
from doge_cli.data.blocks import FORMAT, SHARD_RE, VERSION, shard_name
from doge_cli.data.schema import DATA_STAGES
from doge_cli.data.storage import folder_bytes, inputs_untouched, read_manifest
from doge_cli.errors import DogeError
from doge_cli.io import atomic_dir, write_json

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
    from doge_cli.io import OUTPUT_MARKER, files_in, foreign_files, is_doge_output, write_json

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
                foreign = foreign_files(old)
                if foreign:
                    raise DogeError(f"{old} holds {foreign[0]}, which doge did not write there; move it out (doge "
                                    "replaces only what it created)")
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
                                               disable=not _show_bar(progress)) as bar:
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
    (partial / OUTPUT_MARKER).write_text(json.dumps({"kind": "tokenized pretraining shard",
                                                     "files": files_in(partial)}) + "\n")
    if final.exists():  # an earlier run's shard with other settings: replaced only now that this one is whole
        foreign = foreign_files(final)
        if foreign:
            raise DogeError(f"{final} holds {foreign[0]}, which doge did not write there; move it out (doge "
                            "replaces only what it created)")
        aside = out_dir / f".{name}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(partial, final)
        shutil.rmtree(aside)
    else:
        os.replace(partial, final)
    return manifest


def _show_bar(progress: bool) -> bool:
    """Progress bars on a terminal only: in a log file their redrawn frames would be noise."""
    import sys

    return progress and sys.stderr.isatty()


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


class RowPacker:
    """Puts consecutive conversations greedily in one row up to ``max_length`` (positions restart per
    conversation), carrying only the row being filled from one batch to the next."""

    COLUMNS = ("input_ids", "labels", "position_ids")

    def __init__(self, max_length: int):
        self.max_length = max_length
        self._cur: dict[str, list] = {k: [] for k in self.COLUMNS}

    def add(self, batch: dict[str, list]) -> dict[str, list]:
        """Add a batch of conversations; returns the rows completed by it."""
        rows: dict[str, list] = {k: [] for k in self.COLUMNS}
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            if self._cur["input_ids"] and len(self._cur["input_ids"]) + len(ids) > self.max_length:
                for k in self.COLUMNS:
                    rows[k].append(self._cur[k])
                self._cur = {k: [] for k in self.COLUMNS}
            self._cur["input_ids"] += ids
            self._cur["labels"] += labels
            self._cur["position_ids"] += pos
        return rows

    def finish(self) -> dict[str, list]:
        rows = {k: [self._cur[k]] if self._cur["input_ids"] else [] for k in self.COLUMNS}
        self._cur = {k: [] for k in self.COLUMNS}
        return rows


def pack_rows(ds, max_length: int):
    """:class:`RowPacker` over a whole (small) dataset; returns a ``datasets.Dataset``."""
    import datasets

    packer = RowPacker(max_length)
    rows: dict[str, list] = {k: [] for k in RowPacker.COLUMNS}
    for batch in ds.iter(batch_size=1000):
        for k, v in packer.add(batch).items():
            rows[k] += v
    for k, v in packer.finish().items():
        rows[k] += v
    return datasets.Dataset.from_dict(rows)


def tokenize_chat(raw, tok, max_length: int, *, system: str | None, pack: bool, num_proc: int | None):
    """SFT / R1 of an in-memory ``datasets.Dataset`` (``doge data tokenize`` streams with :func:`tokenize_rows`):
    assistant-only labels from the chat template's generation spans."""
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


def _grpo_batch(batch: dict, tok, max_length: int, system: str | None) -> dict:
    prompts = [_with_system([{"role": "user", "content": p}], system) for p in batch["prompt"]]
    lengths = [len(ids) for ids in tok.apply_chat_template(
        prompts, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]]
    keep = [n <= max_length // 2 for n in lengths]
    return {"prompt": [p for p, k in zip(prompts, keep) if k], "answer": [a for a, k in zip(batch["answer"], keep) if k]}


def prepare_grpo(raw, tok, max_length: int, *, system: str | None):
    """GRPO: chat-message prompts plus exact answers; prompts longer than half the budget are dropped
    so there is room to generate."""
    return raw.map(_grpo_batch, batched=True, remove_columns=raw.column_names, desc="preparing prompts",
                   fn_kwargs={"tok": tok, "max_length": max_length, "system": system})


CHAT_BATCH_ROWS = 1024


def _encoder(stage: str, tok, max_length: int, system: str | None) -> Callable[[dict], dict]:
    fn = _encode_chats if stage in ("sft", "r1") else _encode_dpo if stage == "dpo" else _grpo_batch
    return functools.partial(fn, tok=tok, max_length=max_length, system=system)


def _chat_schema(stage: str):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    if stage in ("sft", "r1"):
        return pa.schema([("input_ids", ids), ("labels", ids), ("position_ids", ids)])
    if stage == "dpo":
        return pa.schema([("prompt_input_ids", ids), ("chosen_input_ids", ids), ("rejected_input_ids", ids)])
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("prompt", pa.list_(message)), ("answer", pa.string())])


_WORK: Callable[[dict], dict] | None = None


def _work_init(fn) -> None:
    global _WORK
    _WORK = fn


def _work(batch: dict) -> dict:
    return _WORK(batch)


@contextlib.contextmanager
def _mapped(fn: Callable[[dict], dict], num_proc: int | None):
    """``map(fn, batches)`` in order: in this process, or in ``num_proc`` forked workers."""
    if not num_proc or num_proc <= 1:
        yield lambda batches: map(fn, batches)
        return
    import multiprocessing

    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker one thread (and no fork warning from tokenizers)
    try:
        with multiprocessing.get_context("fork").Pool(num_proc, initializer=_work_init, initargs=(fn,)) as pool:
            yield lambda batches: pool.imap(_work, batches)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def tokenize_rows(src: Path, dest: Path, stage: str, tok, max_length: int, *, system: str | None, pack: bool,
                  num_proc: int | None, progress: bool) -> tuple[int, int]:
    """Tokenize the chat-stage source ``src`` into the (new, empty) folder ``dest``, streaming: a batch of
    rows is read, encoded (in ``num_proc`` worker processes; by default one per core, except for a source of a
    few batches, which a pool would only slow down), packed (``pack``, SFT/R1) and written before the next
    is read. Returns ``(rows, tokens)`` written."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from doge_cli.data.arrowio import DatasetWriter, iter_batches

    writer = DatasetWriter(dest, _chat_schema(stage))
    packer = RowPacker(max_length) if pack and stage in ("sft", "r1") else None
    column = "chosen_input_ids" if stage == "dpo" else "input_ids"
    tokens = 0

    def write(out: dict) -> None:
        nonlocal tokens
        if column in out:
            tokens += sum(len(ids) for ids in out[column])
        writer.write(pa.table(out, schema=writer.schema))

    total = count_rows(src)
    workers = num_proc if num_proc is not None else (available_cores() if total > 4 * CHAT_BATCH_ROWS else 1)
    with _mapped(_encoder(stage, tok, max_length, system), workers) as run, \
            tqdm(total=total, unit="row", desc=f"{stage}/{src.name}", disable=not _show_bar(progress)) as bar:

        def batches():
            for table in iter_batches(src, CHAT_BATCH_ROWS):
                bar.update(table.num_rows)
                yield table.to_pydict()

        for out in run(batches()):
            write(packer.add(out) if packer else out)
    if packer:
        write(packer.finish())
    return writer.close(), tokens


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
    from doge_cli.data.arrowio import iter_batches
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
                if count_rows(src) == 0:
                    raise DogeError(f"{src} is empty; download it again")
                # Tokenize batches until one row survives (the first batch, almost always).
                encode = _encoder(stage, tok, max_length, system)
                if not any(len(next(iter(encode(t.to_pydict()).values()))) for t in iter_batches(src, PROBE_ROWS)):
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
        with atomic_dir(out_dir, kind=f"{stage} dataset") as tmp:
            rows, tokens = tokenize_rows(src, tmp, stage, tok, max_length, system=system, pack=pack,
                                         num_proc=num_proc, progress=progress)
            if rows == 0:  # pragma: no cover - the probe above found a row that survives
                raise _empty_result_error(stage, src.name, max_length)
            manifest = {"source": f"tokenized:{src.name}", "revision": None, "stage": stage, "rows": rows,
                        "columns": list(_chat_schema(stage).names), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "cache_key": key, "tokenizer": _portable(tokenizer), "tokenizer_fingerprint": fingerprint,
                        "tokens": tokens, "max_length": max_length, "bytes": folder_bytes(tmp)}
            write_json(tmp / "manifest.json", manifest)
        log(f"{stage}/{src.name}: {manifest['rows']:,} prompts with answers" if stage == "grpo" else
            f"{stage}/{src.name}: {manifest['rows']:,} rows, {tokens:,} tokens")
        results.append({**manifest, "cached": False})
    return results


def tokenize_stage(tokenizer: str, datasets_dir: Path, stage: str, max_length: int, **kwargs) -> list[dict]:
    """:func:`tokenize_stages` for one stage."""
    return tokenize_stages(tokenizer, datasets_dir, [stage], max_length, **kwargs)


def _portable(tokenizer: str) -> str:
    """A local tokenizer folder as an absolute path, so training finds it from any working directory."""
    return str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else tokenizer
