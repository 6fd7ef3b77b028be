"""Where a batch-1 decoding step's time goes on a CPU: the fused step (doge_cli/kernels/cpu_decode.c) built
with per-section timers, section by section, against the memory-bandwidth bound.

A decoding step at batch 1 must read every weight once, so its floor is (bytes read) / (memory bandwidth).
This script runs the step of a Doge model (doge's init, Doge-20M shape by default) for ``--steps`` greedy
tokens after a ``--prompt``-token prompt, with a build of the kernel that adds each section's wall time on
thread 0 (``-DDOGE_PROFILE``: ``cpu_decode.profiled_library``), and prints per section: microseconds per
step, its share of the step, the bytes it reads (a product: its matrix in the model's dtype; attention: the
cached keys, values and mask biases, at the run's mean length) and the rate it read them at, against the
bandwidth of summing a float32 buffer of the step's size, measured in the same process right after
(``generation._bandwidth``: the working set decides which cache level serves it). A product's section ends
at its closing barrier, so it holds the slowest thread's share plus the wait. "call overhead" is the wall
time of a call from Python (``FusedStep``: the cache's bookkeeping, the ctypes call, the logits tensor)
and of choosing the next token (the engine's ``greedy_tokens``) less the kernel's
sections. Medians over ``--rounds`` rounds, each from a fresh cache.

    .venv/bin/python benchmarks/decode_profile.py [--size 20M] [--dtypes float32,bfloat16] [--prompt 32]
        [--steps 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def _generation():
    """benchmarks/generation.py, for its bandwidth measurement (loaded by path: benchmarks is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doge_bench_generation", Path(__file__).with_name("generation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dtype_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"dtypes are a comma-separated list of {', '.join(DTYPES)}; got {text!r}")
    return names


def _section_bytes(model, layers: int, mean_keys: float) -> dict[str, float]:
    """Bytes each section (by its name in cpu_decode.SECTIONS) reads per step; the others read ~nothing."""
    from doge_cli.model.modeling import head_dim, is_legacy

    config = model.config
    es = model.lm_head.weight.element_size()  # the matrices' and the cache's dtype
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    hkv, d = config.num_key_value_heads, head_dim(config)
    hb = config.num_attention_heads if is_legacy(config) else hkv
    per_layer = {"qkv product": [attn.q_proj, attn.k_proj, attn.v_proj], "o product": [attn.o_proj],
                 "gate-up product": [mlp.gate_proj, mlp.up_proj], "down product": [mlp.down_proj]}
    reads = {name: sum(m.weight.numel() for m in mods) * es * layers for name, mods in per_layer.items()}
    reads["attention"] = mean_keys * (2 * hkv * d + hb) * es * layers
    reads["final norm, head product"] = model.lm_head.weight.numel() * es
    return reads


PRODUCTS = ("qkv product", "o product", "gate-up product", "down product", "final norm, head product")


def profile(size: str, dtype_name: str, prompt: int, steps: int, rounds: int) -> dict:
    import torch

    from doge_cli.inference.decode import Decoder
    from doge_cli.inference.sampling import greedy_tokens
    from doge_cli.kernels import cpu_decode
    from doge_cli.model import DogeForCausalLM
    from doge_cli.model.modeling import KVCache
    from doge_cli.model.sizes import size_config

    dtype = getattr(torch, dtype_name)
    config = size_config(size)
    torch.manual_seed(0)
    model = DogeForCausalLM(config).eval().to(dtype)
    why = cpu_decode.unsupported(model)
    if why is not None:
        raise SystemExit(f"decode_profile: the fused step cannot run this model here: {why}")
    lib = cpu_decode.profiled_library()
    step = cpu_decode.FusedStep(Decoder(model), lib=lib)
    sections = (ctypes.c_double * len(cpu_decode.SECTIONS)).in_dll(lib, "doge_profile")
    ids = torch.randint(3, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    per_round, walls = [], []
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up (page faults, the scratch buffer) and is dropped
            cache = KVCache(config, 1, prompt + steps + 1, dtype=dtype, device="cpu")
            model(ids, past_key_values=cache, position_ids=torch.arange(prompt)[None])
            for i in range(len(sections)):
                sections[i] = 0.0
            token = torch.tensor([5])
            t0 = time.perf_counter()
            for i in range(steps):
                token = greedy_tokens(step(token, torch.tensor([prompt + i]), cache))
            walls.append((time.perf_counter() - t0) / steps)
            per_round.append([sections[i] / steps for i in range(len(sections))])
    per_round, walls = per_round[1:], walls[1:]
    seconds = [statistics.median(r[i] for r in per_round) for i in range(len(cpu_decode.SECTIONS))]
    wall = statistics.median(walls)
    reads = _section_bytes(model, config.num_hidden_layers, prompt + (steps + 1) / 2)
    total_bytes = step.bytes_read + reads["attention"]
    bandwidth = _generation()._bandwidth(int(total_bytes))
    return {"size": size, "dtype": dtype_name, "sections": seconds, "wall": wall, "reads": reads,
            "bytes": total_bytes, "bandwidth": bandwidth}


def report(result: dict) -> str:
    from doge_cli.kernels.cpu_decode import SECTIONS

    seconds, wall, reads, bw = result["sections"], result["wall"], result["reads"], result["bandwidth"]
    kernel = sum(seconds)
    lines = [f"### {result['size']}, {result['dtype']}: {wall * 1e3:.3f} ms a step ({1 / wall:,.0f} tokens/s); "
             f"bound {result['bytes'] / bw * 1e3:.3f} ms ({result['bytes'] / 1e6:.1f} MB at {bw / 1e9:.1f} GB/s), "
             f"{result['bytes'] / bw / wall:.0%} of it",
             "", "| section | us/step | share | MB read | GB/s | of bandwidth |", "|---|---|---|---|---|---|"]
    for name, spent in zip(SECTIONS, seconds):
        cells = [name, f"{spent * 1e6:.1f}", f"{spent / wall:.1%}"]
        if name in reads and spent > 0:
            rate = reads[name] / spent
            cells += [f"{reads[name] / 1e6:.2f}", f"{rate / 1e9:.1f}", f"{rate / bw:.0%}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| call overhead (Python, ctypes) | {(wall - kernel) * 1e6:.1f} | {(wall - kernel) / wall:.1%} "
                 "|  |  |  |")
    p_time = sum(spent for name, spent in zip(SECTIONS, seconds) if name in PRODUCTS)
    p_bytes = sum(reads[name] for name in PRODUCTS)
    lines += ["", f"- the five products: {p_time / wall:.0%} of the step, reading {p_bytes / 1e6:.1f} MB at "
                  f"{p_bytes / p_time / 1e9:.1f} GB/s ({p_bytes / p_time / bw:.0%} of the bandwidth)",
              f"- everything else (attention over the cache included): {(wall - p_time) * 1e6:.0f} us a step"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="20M")
    parser.add_argument("--dtypes", type=_dtype_list, default=list(DTYPES), help="comma-separated")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.prompt < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--prompt, --steps and --rounds must be at least 1")
    from doge_cli.config.presets import SIZES, normalize_size

    if normalize_size(args.size) is None:
        parser.error(f"unknown --size {args.size!r}; sizes: {', '.join(SIZES)}")
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.size}, prompt {args.prompt}, {args.steps} steps, "
          f"median of {args.rounds} rounds\n")
    for name in args.dtypes:
        print(report(profile(args.size, name, args.prompt, args.steps, args.rounds)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
