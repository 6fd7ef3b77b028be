"""Data commands at scale: peak memory, speed and bytes on disk of `doge data download --local`,
`tokenize --stage pt` and `merge --stage pt` on synthetic jsonl corpora of two sizes.

Each corpus is documents of 1-6 paragraphs drawn (seeded) from the builtin pretraining texts, so a
tokenizer trained on those texts sees realistic words. Every command runs as its own process; its
memory is sampled every 20 ms over the process and its children: peak RSS (what `/usr/bin/time`
reports) and peak anonymous memory (RSS minus file-backed pages, i.e. memory that is not page cache).
Tokenize is also run with --num-proc 1 to show the scaling with cores.

    .venv/bin/python benchmarks/data_scale.py [--sizes 40,400] [--tokenizer PATH] [--keep DIR]

Sizes are in MB of jsonl. Prints one table per size and the ratio of the larger to the smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: float, seed: int = 0, stage: str = "pt") -> int:
    """Write a jsonl corpus of about ``megabytes`` MB; returns the number of documents (pt) or
    conversations of a user and an assistant turn (sft)."""
    from doge_cli.data.builtin import BUILTIN_SOURCES, build_builtin_rows

    paragraphs = []
    for name, src in BUILTIN_SOURCES.items():
        if src.stage == "pt":
            for row in build_builtin_rows(name):
                paragraphs += [p for p in row["text"].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 6)))
            if stage == "sft":
                row = {"messages": [{"role": "user", "content": rng.choice(paragraphs)},
                                    {"role": "assistant", "content": text}]}
            else:
                row = {"text": text, "id": docs}
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its wall time, peak RSS and peak anonymous memory (MB) over its process tree."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss = anon = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                info = p.memory_info()
                rss += info.rss
                anon += info.rss - info.shared
        except psutil.Error:
            pass
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss / 1e6, "peak_anon_mb": peak_anon / 1e6,
            "stdout": out}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(work: Path, megabytes: float, tokenizer: str, env: dict, threads: list[int], stage: str = "pt") -> dict:
    corpus = work / f"corpus-{megabytes:g}mb.jsonl"
    docs = make_corpus(corpus, megabytes, stage=stage)
    ds = work / f"datasets-{megabytes:g}"
    doge = [sys.executable, "-m", "doge_cli"]
    rows = {"docs": docs, "jsonl_mb": corpus.stat().st_size / 1e6}
    rows["download"] = measure(doge + ["data", "download", "--local", str(corpus), "--stage", stage, "--name", "synth",
                                       "--save-dir", str(ds)], env)
    rows["raw_bytes"] = folder_bytes(ds / stage / "synth")
    for n in threads:
        shutil.rmtree(ds / "tokenized", ignore_errors=True)
        rows[f"tokenize-{n}"] = measure(doge + ["data", "tokenize", "--tokenizer", tokenizer, "--datasets-dir", str(ds),
                                                "--stage", stage, "--max-length", "2048", "--num-proc", str(n)], env)
    rows["tokens"] = sum(json.loads(m.read_text())["tokens"]
                         for m in (ds / "tokenized" / stage / "synth").rglob("manifest.json"))
    rows["tokenized_bytes"] = folder_bytes(ds / "tokenized" / stage)
    rows["merge"] = measure(doge + ["data", "merge", "--datasets-dir", str(ds), "--stage", stage,
                                    "--test-examples", "100"], env)
    rows["merged_bytes"] = folder_bytes(ds / "merged" / stage)
    shutil.rmtree(ds, ignore_errors=True)
    corpus.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="40,400", help="corpus sizes in MB of jsonl, comma-separated")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: a 32,768-token BPE trained on the builtin data)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="--num-proc values for tokenize")
    parser.add_argument("--keep", help="work in this folder and keep it")
    parser.add_argument("--stage", default="pt", choices=["pt", "sft"], help="pretraining documents or chat "
                        "conversations (sft: tokenize through the chat template, packed rows are not used)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="doge-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DOGE_PLAIN_LOGS": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(work / "tokenizer")
        if not Path(tokenizer).is_dir():
            doge = [sys.executable, "-m", "doge_cli"]
            subprocess.run(doge + ["data", "download", "--recipe", "quickstart", "--save-dir", str(work / "qs")],
                           env=env, check=True, capture_output=True)
            subprocess.run(doge + ["data", "train-tokenizer", "--out", tokenizer, "--vocab-size", "32768",
                                   "--datasets-dir", str(work / "qs")], env=env, check=True, capture_output=True)
    results = {size: run_size(work, size, tokenizer, env, threads, args.stage) for size in sizes}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"tokenizer {tokenizer}; stage {args.stage}; max length 2048")
    steps = ["download"] + [f"tokenize-{n}" for n in threads] + ["merge"]
    print("| corpus | tokens | command | seconds | tokens/s | peak RSS MB | peak anon MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        for step in steps:
            m = r[step]
            print(f"| {r['jsonl_mb']:,.0f} MB | {r['tokens']:,} | {step} | {m['seconds']:.1f} | "
                  f"{r['tokens'] / m['seconds']:,.0f} | {m['peak_rss_mb']:,.0f} | {m['peak_anon_mb']:,.0f} |")
        print(f"| {r['jsonl_mb']:,.0f} MB | | bytes per token: jsonl {r['jsonl_mb'] * 1e6 / r['tokens']:.2f}, raw "
              f"{r['raw_bytes'] / r['tokens']:.2f}, tokenized {r['tokenized_bytes'] / r['tokens']:.3f}, "
              f"merged {r['merged_bytes'] / r['tokens']:.4f} | | | | |")
    if len(sizes) > 1:
        small, large = results[sizes[0]], results[sizes[-1]]
        ratios = ", ".join(f"{step} {large[step]['peak_rss_mb'] / small[step]['peak_rss_mb']:.2f}x" for step in steps)
        print(f"peak RSS, {sizes[-1]:g} MB corpus over {sizes[0]:g} MB: {ratios}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
