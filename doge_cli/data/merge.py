"""``doge data merge``: mix a stage's tokenized sources by ratio, shuffle, split off a test set.

Pretraining is merged as an index: which block of which tokenized source each row is (a few bytes a row,
no second copy of the tokens; ``doge_cli.data.blocks``). The other stages are written as a DatasetDict, a
chunk of rows at a time (memory flat in the data's size). Everything is Arrow column work (``take`` with
index arrays), never a Python loop over rows, and the order is what ``concatenate_datasets`` of the picks
followed by ``shuffle(seed)`` gives. Per source, the test rows are taken first from a
seeded permutation and the train rows from the rest, so test and train never share a row; a
source too small for its train share is repeated (whole epochs of it, then a seeded part).

Output: ``<datasets_dir>/merged/<stage>/`` (a DatasetDict with ``train`` and ``test``) and a
manifest.json with the rows taken from each source.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from doge_cli.data.arrowio import count_rows
from doge_cli.data.schema import DATA_STAGES
from doge_cli.data.storage import folder_bytes, read_manifest
from doge_cli.errors import DogeError
from doge_cli.io import atomic_dir, check_replaceable, write_json

MAX_PASSES = 1000  # --train-examples beyond this many passes over the data is a typo, not a plan

# The seed's pretraining mixture; builtin sources get weights by how much text they hold.
DEFAULT_RATIOS: dict[str, float] = {
    "fineweb-edu-dedup": 7.0,
    "cosmopedia-v2": 2.0,
    "python-edu": 0.5,
    "finemath": 0.5,
    "bible-kjv": 3.0,
    "bible-web": 3.0,
    "fortunes": 3.0,
    "python-docs": 0.5,
}


def parse_ratios(items: list[str] | None) -> dict[str, float]:
    """``["a=7", "b=2"]`` -> ``{"a": 7.0, "b": 2.0}``, with one-line errors for bad items."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or not math.isfinite(weight) or weight < 0:
            raise DogeError(f"bad --ratio {item!r}; write name=weight, e.g. --ratio fineweb-edu-dedup=7")
        out[name] = weight
    return out


def plan_counts(sizes: dict[str, int], weights: dict[str, float], total: int) -> dict[str, int]:
    """Split ``total`` rows across sources in proportion to ``weights`` (largest remainder rounding)."""
    names = [n for n in sizes if weights.get(n, 0) > 0]
    w = np.array([weights[n] for n in names], dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts))[: total - int(counts.sum())]:
        counts[i] += 1
    return dict(zip(names, counts.tolist()))


def _take(rng: np.random.Generator, order: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices from ``order``: whole passes over it, then a seeded part of it."""
    if n == 0 or len(order) == 0:
        return np.empty(0, dtype=np.int64)
    reps, rest = divmod(n, len(order))
    parts = [order] * reps + [rng.permutation(order)[:rest]]
    return np.concatenate(parts)


def _tokenized_sources(base: Path, stage: str) -> tuple[list[Path], dict[str, dict]]:
    """The tokenized source folders of a stage and their manifests, which must agree on the tokenizer
    (identified by its fingerprint: vocabulary, merges, specials, template, never its path) and length."""
    dirs = sorted(p for p in base.glob("*") if (p / "state.json").is_file())
    if not dirs:
        raise DogeError(f"no tokenized {stage} data under {base}; run `doge data tokenize --stage {stage}` first")
    made_with = {p.name: read_manifest(p) for p in dirs}
    broken = [name for name, m in made_with.items() if not m or not isinstance(m.get("cache_key"), dict)]
    if broken:
        raise DogeError(f"{base / broken[0]} has no readable manifest from `doge data tokenize`; "
                        f"re-run `doge data tokenize --stage {stage}`")
    fingerprints = {m["cache_key"].get("tokenizer") for m in made_with.values()}
    if len(fingerprints) > 1:
        by = ", ".join(f"{n}: {m.get('tokenizer')} ({m['cache_key'].get('tokenizer')})" for n, m in made_with.items())
        raise DogeError(f"the tokenized {stage} sources were made with different tokenizers ({by}); "
                        f"re-run `doge data tokenize --stage {stage}` with one tokenizer")
    lengths = {m["cache_key"].get("max_length") for m in made_with.values()}
    if len(lengths) > 1:
        raise DogeError(f"the tokenized {stage} sources were made with different --max-length values "
                        f"({', '.join(map(str, sorted(lengths, key=str)))}); re-run `doge data tokenize --stage {stage}` "
                        "with one --max-length")
    return dirs, made_with


def _mixture(sizes_all: dict[str, int], ratios: dict[str, float], stage: str,
             train_examples: int | None, test_examples: int) -> tuple[dict[str, float], dict[str, int], int]:
    """``(weights, sizes of the sources used, train_examples)`` of a mixture, checked."""
    unknown = [n for n in ratios if n not in sizes_all]
    if unknown:
        raise DogeError(f"--ratio names {unknown[0]!r}, not a tokenized {stage} source; sources: {', '.join(sizes_all)}")
    if ratios:  # sources the user left out of an explicit mixture are not used
        weights = {n: ratios.get(n, 0.0) for n in sizes_all}
    else:
        weights = {n: DEFAULT_RATIOS.get(n, 1.0) for n in sizes_all}
    sizes = {n: size for n, size in sizes_all.items() if weights[n] > 0}
    if not sizes:
        raise DogeError("every ratio is 0; give at least one source a positive weight")
    if train_examples is not None and train_examples > MAX_PASSES * sum(sizes.values()):
        raise DogeError(f"--train-examples {train_examples:,} would repeat the {sum(sizes.values()):,} available rows "
                        f"more than {MAX_PASSES} times; lower it (or add data)")
    if train_examples is None:
        # The largest mixture in which no source repeats (test rows included).
        share = {n: weights[n] / sum(weights[m] for m in sizes) for n in sizes}
        total = int(min(sizes[n] / share[n] for n in sizes))
        train_examples = total - test_examples
        if train_examples <= 0:
            raise DogeError(f"only {total} rows at these ratios; lower --test-examples")
    return weights, sizes, train_examples


def merge_stage(
    datasets_dir: Path,
    stage: str,
    *,
    train_examples: int | None,
    test_examples: int,
    seed: int = 233,
    ratios: dict[str, float] | None = None,
    out: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Merge ``tokenized/<stage>/*`` into ``merged/<stage>``; returns the manifest.

    ``train_examples=None`` takes as many rows as the mixture allows without repeating any source.
    Pretraining is merged as an index over the tokenized sources' blocks (no second copy of the tokens);
    the other stages as a DatasetDict.
    """
    if stage not in DATA_STAGES:
        raise DogeError(f"unknown stage {stage!r}; choose from: {', '.join(DATA_STAGES)}")
    if test_examples < 0 or (train_examples is not None and train_examples <= 0):
        raise DogeError("--train-examples must be positive and --test-examples not negative")
    out = Path(out) if out is not None else Path(datasets_dir) / "merged" / stage
    check_replaceable(out, "merge output")
    if stage == "pt":
        return _merge_pt(Path(datasets_dir), out, train_examples=train_examples, test_examples=test_examples,
                         seed=seed, ratios=ratios, log=log)
    dirs, made_with = _tokenized_sources(Path(datasets_dir) / "tokenized" / stage, stage)
    folders = {p.name: p for p in dirs}
    weights, sizes, train_examples = _mixture({n: count_rows(p) for n, p in folders.items()}, dict(ratios or {}),
                                              stage, train_examples, test_examples)
    picked, used = _pick_rows(sizes, weights, train_examples, test_examples, seed, log)
    names = list(picked)
    first = next(iter(made_with.values()))
    manifest = {"stage": stage, "seed": seed, "sources": used, "tokenizer": first.get("tokenizer"),
                "tokenizer_fingerprint": first["cache_key"].get("tokenizer"),
                "max_length": first["cache_key"].get("max_length")}
    with atomic_dir(out, kind=f"merged {stage} dataset") as tmp:
        for split, (source, row) in _shuffled(picked, names, seed).items():
            (tmp / split).mkdir()
            manifest[f"{split}_rows"] = _write_rows(tmp / split, [folders[n] for n in names], source, row)
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}), encoding="utf-8")
        manifest["bytes"] = folder_bytes(tmp)
        write_json(tmp / "manifest.json", manifest)
    log(f"merged {stage}: {manifest['train_rows']:,} train, {manifest['test_rows']:,} test -> {out}")
    return manifest


BUCKET_BYTES = 32 * 2**20  # merged rows sorted in memory at a time (their average size), at most
MAX_BUCKETS = 256  # bucket files open at once


def _shuffled(picked: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], seed: int
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, ``(source, row)`` of every merged row: the picks of each source in turn, then shuffled as
    ``datasets.Dataset.shuffle(seed)`` shuffles (train ``seed``, test ``seed + 1``)."""
    out = {}
    for split, which, shuffle_seed in (("train", 0, seed), ("test", 1, seed + 1)):
        source = np.concatenate([np.full(len(picked[n][which]), i, dtype=np.uint16) for i, n in enumerate(names)])
        row = np.concatenate([picked[n][which].astype(np.int64) for n in names])
        order = np.random.default_rng(shuffle_seed).permutation(len(row))
        out[split] = (source[order], row[order])
    return out


def _write_rows(dest: Path, folders: list[Path], source: np.ndarray, row: np.ndarray) -> int:
    """Rows ``row[i]`` of ``folders[source[i]]``, in the order ``i``, into ``dest`` (a saved dataset).

    An external shuffle, so memory is a batch or a bucket whatever the data's size: each source is read
    once, in order, with plain file reads, and every row it contributes is appended (with its position) to
    the bucket file of its position's range; then each bucket is sorted by position in memory and written
    out. Disk: one more copy of the merged rows while it runs, in ``dest``'s parent (removed after)."""
    import pyarrow as pa

    from doge_cli.data.arrowio import DatasetWriter, iter_batches

    schema = _source_schema(folders[0])
    writer = DatasetWriter(dest, schema)
    n = len(row)
    if n == 0:
        return writer.close()
    sizes = [(folder_bytes(f), count_rows(f)) for f in folders]
    row_bytes = max(1.0, sum(b for b, _ in sizes) / max(1, sum(c for _, c in sizes)))
    per_bucket = max(int(BUCKET_BYTES // row_bytes), -(-n // MAX_BUCKETS), 1)
    buckets = -(-n // per_bucket)
    spill = dest.parent / f".{dest.name}.buckets"
    spill.mkdir()
    with_pos = schema.append(pa.field("__pos", pa.int64()))
    sinks: dict[int, tuple] = {}
    try:
        for s, folder in enumerate(folders):
            mine = np.flatnonzero(source == s)
            if len(mine) == 0:
                continue
            by_row = np.argsort(row[mine], kind="stable")
            rows_sorted, pos_sorted = row[mine][by_row], mine[by_row]
            offset = 0
            for table in iter_batches(folder, 4096):
                lo, hi = np.searchsorted(rows_sorted, [offset, offset + table.num_rows])
                if hi > lo:
                    picked = table.cast(schema).take(pa.array(rows_sorted[lo:hi] - offset))
                    positions = pos_sorted[lo:hi]
                    picked = picked.append_column("__pos", pa.array(positions))
                    bucket_of = positions // per_bucket
                    for k in np.unique(bucket_of):
                        if k not in sinks:
                            sink = pa.OSFile(str(spill / f"{k:05d}.arrow"), "wb")
                            sinks[k] = (sink, pa.ipc.new_stream(sink, with_pos))
                        sinks[k][1].write_table(picked.take(pa.array(np.flatnonzero(bucket_of == k))))
                offset += table.num_rows
        for sink, stream in sinks.values():
            stream.close()
            sink.close()
        sinks.clear()
        for k in range(buckets):
            path = spill / f"{k:05d}.arrow"
            with pa.OSFile(str(path)) as f:
                part = pa.ipc.open_stream(f).read_all()
            writer.write(part.sort_by("__pos").drop_columns(["__pos"]))
            del part
            path.unlink()
        return writer.close()
    finally:
        for sink, stream in sinks.values():
            stream.close()
            sink.close()
        import shutil

        shutil.rmtree(spill, ignore_errors=True)


def _source_schema(folder: Path):
    import pyarrow as pa

    from doge_cli.data.arrowio import data_files

    with pa.OSFile(str(data_files(folder)[0])) as f:
        return pa.ipc.open_stream(f).schema


def _pick_rows(sizes: dict[str, int], weights: dict[str, float], train_examples: int, test_examples: int, seed: int,
               log: Callable[[str], None]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, dict]]:
    """Per source, the rows of train and of test (disjoint): ``{name: (train_idx, test_idx)}`` and what was
    taken from each."""
    share = {n: weights[n] / sum(weights[m] for m in sizes) for n in sizes}
    test_counts = plan_counts(sizes, share, test_examples)
    train_counts = plan_counts(sizes, share, train_examples)
    rng = np.random.default_rng(seed)
    picked, used = {}, {}
    for name in sizes:
        order = rng.permutation(sizes[name])
        n_test = test_counts[name]
        if n_test >= sizes[name]:
            raise DogeError(f"source {name} has {sizes[name]} rows, too few for {n_test} test rows; lower --test-examples")
        test_idx, train_pool = order[:n_test], order[n_test:]
        train_idx = _take(rng, train_pool, train_counts[name])
        picked[name] = (train_idx, test_idx)
        used[name] = {"train": int(len(train_idx)), "test": int(n_test), "available": sizes[name],
                      "weight": weights[name], "repeats": round(len(train_idx) / max(1, len(train_pool)), 3)}
        log(f"{name}: {len(train_idx):,} train + {n_test:,} test of {sizes[name]:,} rows (weight {weights[name]:g})")
    return picked, used


def _merge_pt(datasets_dir: Path, out: Path, *, train_examples, test_examples, seed, ratios, log) -> dict:
    """Pretraining: ``{split}-source.npy`` / ``{split}-block.npy`` say which block of which tokenized source
    each row is, in the order a DatasetDict merge of the same blocks would hold them (the same per-source
    picks and the same seeded shuffles); memory and disk are a few bytes a row, not a copy of the tokens."""
    import os

    from doge_cli.data.blocks import INDEX_FORMAT, VERSION, TokenStream

    base = datasets_dir / "tokenized" / "pt"
    dirs = sorted(p for p in base.glob("*") if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DogeError(f"no tokenized pt data under {base}; run `doge data tokenize --stage pt` first")
    streams = {p.name: TokenStream(p) for p in dirs}  # checks each source's shards (complete, one setting)
    keys = {n: s.cache_key for n, s in streams.items()}
    if len({k.get("tokenizer") for k in keys.values()}) > 1:
        by = ", ".join(f"{n}: {k.get('tokenizer')}" for n, k in keys.items())
        raise DogeError(f"the tokenized pt sources were made with different tokenizers ({by}); re-run "
                        "`doge data tokenize --stage pt` with one tokenizer")
    lengths = {s.max_length for s in streams.values()}
    if len(lengths) > 1:
        raise DogeError(f"the tokenized pt sources were made with different --max-length values "
                        f"({', '.join(map(str, sorted(lengths)))}); re-run `doge data tokenize --stage pt` with one "
                        "--max-length")
    weights, sizes, train_examples = _mixture({n: s.blocks for n, s in streams.items()}, dict(ratios or {}), "pt",
                                              train_examples, test_examples)
    picked, used = _pick_rows(sizes, weights, train_examples, test_examples, seed, log)
    names = list(picked)
    if len(names) > np.iinfo(np.uint16).max:  # pragma: no cover - far beyond any mixture
        raise DogeError("more than 65,535 pretraining sources; merge fewer")
    splits = _shuffled(picked, names, seed)
    first = streams[names[0]]
    manifest = {"format": INDEX_FORMAT, "version": VERSION, "stage": "pt", "seed": seed,
                "train_rows": len(splits["train"][1]), "test_rows": len(splits["test"][1]),
                "max_length": first.max_length, "tokenizer": _first_shard_manifest(first).get("tokenizer"),
                "tokenizer_fingerprint": first.cache_key.get("tokenizer"),
                "tokens": {"train": int(len(splits["train"][1])) * first.max_length,
                           "test": int(len(splits["test"][1])) * first.max_length},
                "sources": {n: {**used[n], "path": os.path.relpath(streams[n].folder.resolve(), out.resolve()),
                                "build_ids": streams[n].build_ids, "tokens": streams[n].tokens,
                                "documents": streams[n].documents} for n in names}}
    with atomic_dir(out, kind="merged pt index") as tmp:
        for split, (source, block) in splits.items():
            np.save(tmp / f"{split}-source.npy", source)
            np.save(tmp / f"{split}-block.npy", block)
        manifest["bytes"] = folder_bytes(tmp)
        write_json(tmp / "manifest.json", manifest)
    tokens = sum(s.tokens for s in streams.values())
    log(f"merged pt: {manifest['train_rows']:,} train, {manifest['test_rows']:,} test blocks of {first.max_length} "
        f"-> {out} (an index over {tokens:,} tokenized tokens; {manifest['bytes'] / 2**20:.1f} MiB)")
    for stream in streams.values():
        stream.close()
    return manifest


def _first_shard_manifest(stream) -> dict:
    from doge_cli.io import read_json_object

    return read_json_object(stream.shards[0].folder / "manifest.json") or {}
