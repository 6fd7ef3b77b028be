"""What the lower precisions cost in quality: held-out perplexity and greedy-token agreement with fp32.

For each model folder (default: the demo's pretrained, SFT and DPO models, from ``make demo``) and each
precision doge can load it in (``--dtype fp32``, ``--dtype bf16``, ``--quantize int8``):

- **held-out perplexity**: token-level, over the builtin held-out text (``datasets/eval/heldout-text``,
  from ``doge data download --recipe quickstart``), each document cut into windows of ``--window`` tokens
  (the demo's training length), every token after a window's first one scored;
- **greedy agreement**: ``--prompts`` prompts (each held-out document's first 16 tokens) continued greedily
  for ``--new`` tokens with no stop, through doge's engine; the share of positions whose token equals
  fp32's, and the median position of the first difference (``--new`` when none differ).

    .venv/bin/python benchmarks/precision_quality.py [--models DIR ...] [--heldout FILE] [--new 256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
PRECISIONS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"dtype": "fp32", "quantize": "int8"}}


def perplexity(model, docs: list[list[int]], window: int) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start:start + window])[None]
                if chunk.shape[1] < 2:
                    continue
                logits = model(chunk).logits.float()
                loss = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
                total += loss.item()
                count += chunk.shape[1] - 1
    return math.exp(total / count)


def greedy(model, tok, prompts: list[list[int]], new: int) -> list[list[int]]:
    from doge_cli.inference import Engine, Request, SamplingParams

    requests = [Request(list(p), SamplingParams(greedy=True, max_new_tokens=new), stop_token_ids=[]) for p in prompts]
    Engine(model, tok, max_batch=8).generate(requests)
    return [r.token_ids for r in requests]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path,
                        default=[DEMO / "runs" / "quickstart" / s / "final" for s in ("pt", "sft", "dpo")])
    parser.add_argument("--heldout", type=Path, default=DEMO / "datasets" / "eval" / "heldout-text" / "test.jsonl")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--docs", type=int, default=200, help="held-out documents scored (the first N)")
    args = parser.parse_args(argv)
    import torch

    from doge_cli.chat.loading import load_model_and_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    for path in [*args.models, args.heldout]:
        if not path.exists():
            print(f"{path} does not exist; run `make demo` first (or pass --models / --heldout)", file=sys.stderr)
            return 2
    texts = [json.loads(line)["text"] for line in args.heldout.read_text().splitlines()[:args.docs]]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {len(texts)} held-out "
          f"documents in {args.window}-token windows; {args.prompts} prompts x {args.new} greedy tokens")
    print("| model | precision | held-out ppl | vs fp32 | greedy tokens equal to fp32 | first difference (median) |")
    print("|---|---|---|---|---|---|")
    worst = {}
    for folder in args.models:
        base_ppl, base_tokens = None, None
        for name, flags in PRECISIONS.items():
            model, tok = load_model_and_tokenizer(str(folder), device="cpu", **flags)
            docs = [tok(t)["input_ids"] for t in texts]
            prompts = [d[:16] for d in docs if len(d) >= 16][:args.prompts]
            ppl = perplexity(model, docs, min(args.window, model.config.max_position_embeddings))
            new = min(args.new, model.config.max_position_embeddings - 16)
            tokens = greedy(model, tok, prompts, new)
            if base_ppl is None:
                base_ppl, base_tokens = ppl, tokens
            same = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(tokens, base_tokens)]
            first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, base_tokens)]
            change = ppl / base_ppl - 1
            worst[name] = max(worst.get(name, 0.0), abs(change))
            label = folder.parent.name if folder.name == "final" else folder.name
            print(f"| {label} | {name} | {ppl:.3f} | {change:+.2%} | {statistics.mean(same):.1%} | "
                  f"{statistics.median(first):.0f} of {new} |")
    print("largest perplexity change: " + ", ".join(f"{k} {v:.2%}" for k, v in worst.items() if k != "fp32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
