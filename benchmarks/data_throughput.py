"""Tokenize throughput of `doge data tokenize` (pt: Rust batch encoding streamed into a 2-byte token
stream) against a plain `datasets.map` + tokenizer baseline, on the builtin pretraining corpus, side by side.

    .venv/bin/python benchmarks/data_throughput.py [--tokenizer PATH] [--repeats 3]

Without --tokenizer a 32k byte-level BPE is trained on the corpus first (not timed). Prints
tokens/s for each and the ratio (doge / baseline); medians over the repeats, run alternately.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    os.environ.pop("TOKENIZERS_PARALLELISM", None)  # both sides may use every core

    import datasets
    import pyarrow.compute as pc

    from doge_cli.data.builtin import BUILTIN_SOURCES, build_builtin_rows
    from doge_cli.data.download import download_recipe
    from doge_cli.data.tokenization import tokenize_stages
    from doge_cli.data.tokenizer import load_tokenizer, train_tokenizer

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="doge-bench-"))
    pt_sources = [n for n, s in BUILTIN_SOURCES.items() if s.stage == "pt"]
    tok_path = args.tokenizer
    if tok_path is None:
        download_recipe("quickstart", work / "datasets", sources=pt_sources)
        tok_path = str(work / "tokenizer")
        train_tokenizer(Path(tok_path), datasets_dir=work / "datasets", vocab_size=32768)
    tok = load_tokenizer(tok_path)
    rows = [r for name in pt_sources for r in build_builtin_rows(name)]
    corpus = datasets.Dataset.from_list(rows)
    corpus_dir = work / "bench" / "pt" / "corpus"
    corpus.save_to_disk(str(corpus_dir))
    mib = sum(len(r["text"].encode()) for r in rows) / 2**20

    # Both sides end with their token ids in an Arrow table and count them there (O(1) per row, no
    # conversion to Python lists): the timed work is tokenizing and storing, nothing else.
    def baseline() -> int:
        out = corpus.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        return int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())

    def doge() -> int:
        import shutil

        shutil.rmtree(work / "bench" / "tokenized", ignore_errors=True)
        (manifest,) = tokenize_stages(tok_path, work / "bench", ["pt"], args.max_length, progress=False)
        return manifest["tokens"]

    times: dict[str, list[float]] = {"baseline": [], "doge": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in (("baseline", baseline), ("doge", doge)):
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    # Throughput counts the corpus's real tokens (baseline's count) for both, so packing's
    # padding and EOS tokens do not inflate doge's number.
    real = tokens["baseline"]
    rate = {k: real / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; corpus {mib:.1f} MiB, {real:,} tokens, vocab {len(tok):,}")
    print(f"{'method':<34}{'median s':>10}{'tokens/s':>14}")
    print(f"{'datasets.map + tokenizer (baseline)':<34}{statistics.median(times['baseline']):>10.2f}"
          f"{rate['baseline']:>14,.0f}")
    print(f"{'doge tokenize pt (token stream)':<34}{statistics.median(times['doge']):>10.2f}{rate['doge']:>14,.0f}")
    print(f"ratio doge / baseline: {rate['doge'] / rate['baseline']:.2f}x")


if __name__ == "__main__":
    main()
