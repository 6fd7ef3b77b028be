"""Peak memory and speed: fused linear cross-entropy vs full logits + F.cross_entropy (CPU).

Shape: 8 x 2048 tokens, hidden 256, vocab 32768 (Doge-20M), loss + backward to hidden and weight.

Memory method: every variant runs in a fresh subprocess. The child allocates the inputs, reads
its peak resident set size (``ru_maxrss``), runs one forward + backward, and reads it again; the
difference is the extra peak memory the loss needed, as the operating system saw it (no
allocator bookkeeping to trust). A fresh process per variant keeps one variant's high-water mark
from hiding the other's. Timing: median of ``--repeats`` forward + backward runs after one warm-up,
in a second phase of the same child (after the memory reading).

    python benchmarks/fused_ce.py [--tokens 16384] [--vocab 32768] [--hidden 256] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _child(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, repeats: int, dtype: str) -> dict:
    import torch
    import torch.nn.functional as F

    from doge_cli.kernels.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(tokens, hidden, dtype=dt).requires_grad_()
    w = (torch.randn(vocab, hidden, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    t[::17] = -100

    def step():
        if variant == "fused":
            loss = linear_cross_entropy(h, w, t, chunk_size=chunk)
        else:
            loss = F.cross_entropy((h @ w.t()).float(), t)
        loss.backward()
        h.grad = None
        w.grad = None
        return loss.item()

    # Allocate the gradients' storage once in the baseline so both variants are charged only for
    # their intermediates (the .grad tensors are the same size either way).
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    h.grad = w.grad = None
    loss = step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "loss": loss, "extra_peak_mib": (peak_kib - base_kib) / 1024,
            "median_s": statistics.median(times), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats,
                                args.dtype)))
        return

    results = {}
    for variant in ("unfused", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--hidden",
               str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--repeats",
               str(args.repeats), "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    u, f = results["unfused"], results["fused"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"fused linear cross-entropy, {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.dtype}, chunk {args.chunk}, {u['threads']} threads (fp32 logits alone: {logits_mib:.0f} MiB)\n")
    print("| variant | loss | extra peak memory (MiB) | fwd+bwd median (s) |")
    print("|---|---|---|---|")
    for r in (u, f):
        print(f"| {r['variant']} | {r['loss']:.5f} | {r['extra_peak_mib']:.0f} | {r['median_s']:.2f} |")
    print(f"\nmemory ratio fused/unfused: {f['extra_peak_mib'] / max(u['extra_peak_mib'], 1e-9):.3f}; "
          f"speed ratio unfused/fused time: {u['median_s'] / f['median_s']:.2f}x")


if __name__ == "__main__":
    main()
