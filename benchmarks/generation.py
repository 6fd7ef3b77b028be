"""Generation speed: doge's engine against transformers' ``generate`` on the native Doge, side by side,
and against the memory-bandwidth bound of batch decoding.

Same weights (doge's init copied into transformers' model), Doge-20M shape by default, greedy, no early
stop (``min_new_tokens`` on the reference, no stop ids on doge). For each precision (fp32, bf16 weights,
and on the CPU doge's weight-only ``int8``, which transformers' stack has no counterpart for here), prompt
length (32, 512) and batch (1, 8): new tokens/s of a 64-token reply, time to first token (a 1-token reply:
prefill and the first choice), and the peak resident memory of the process.

The bound: a decoding step reads every weight once (doge's step: ``Decoder.weight_bytes``: with the fused
CPU step, doge_cli/kernels/cpu_decode.c, the matrices in the model's own dtype; int8 weights with their
scales; the PyTorch step computes bf16 models with fp32 copies, so it reads fp32 bytes) plus each row's keys,
values and mask biases; at a memory bandwidth of B bytes/s a batch of b rows makes at most
``b * B / (weights + b * cache)`` tokens/s. B is measured in the same process right after the run, as the
median rate of summing a float32 buffer the size of the step's reads (the working set decides which cache
level serves it). "decode tok/s" counts the decoding steps alone (the 64-token reply's time less the
1-token reply's, i.e. prefill and first choice taken out; "too short" where a reply of a few tokens took
no longer than its first, which happens at tiny sizes); "of bound" is that rate over the bound.

Every (stack, precision) pair runs in its own subprocess so its memory is its own; the stacks alternate per
round and each figure is the median over the rounds. On a CPU two more stacks run: ``doge-torch``, doge's
PyTorch decoding step (``DOGE_CPU_KERNEL=0``: what the fused step replaces), and, without ``--quick``,
``doge-compiled``, which decodes through the torch.compile'd PyTorch step (``Engine(compile=True)``; its
compiling happens in the warm-up, outside the timings). On a GPU a third stack, ``doge-eager``, decodes
without CUDA graphs (``DOGE_CUDA_GRAPHS=0``): the graphs' speed-up, and whether they chose the same
tokens as eager decoding.

    .venv/bin/python benchmarks/generation.py [--size 20M] [--new 64] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PRECISIONS = ("float32", "bfloat16", "int8")  # int8: doge's weight-only int8 (CPU only)


def _bandwidth(nbytes: int) -> float:
    """Bytes/s of reading a float32 buffer of ``nbytes`` (median of repeated sums)."""
    import torch

    buffer = torch.ones(max(1, nbytes // 4))
    for _ in range(3):
        buffer.sum()
    times = []
    for _ in range(max(5, min(50, int(2e9 // max(nbytes, 1))))):
        t0 = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - t0)
    return buffer.numel() * 4 / statistics.median(times)


def _child(stack: str, size: str, dtype: str, prompts: list[int], batches: list[int], new: int,
           device: str = "cpu") -> dict:
    import warnings

    import torch

    from doge_cli.model import DogeForCausalLM
    from doge_cli.model.modeling import head_dim
    from doge_cli.model.sizes import size_config

    warnings.filterwarnings("ignore")
    if stack == "doge-eager":
        os.environ["DOGE_CUDA_GRAPHS"] = "0"
    if stack == "doge-torch":
        os.environ["DOGE_CPU_KERNEL"] = "0"
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = size_config(size)
    config.eos_token_id = None
    ours = DogeForCausalLM(config, attn_implementation="sdpa").eval()
    if stack == "reference":
        from transformers import DogeForCausalLM as HFDoge

        model = HFDoge(config).eval()
        model.load_state_dict(ours.state_dict())
        model.set_attn_implementation("sdpa")
        del ours
    else:
        model = ours
    model = model.to(device=device, dtype=torch.float32 if dtype == "int8" else getattr(torch, dtype))
    if dtype == "int8":
        from doge_cli.model.quantize import quantize_int8

        quantize_int8(model)
    cuda = model.device.type == "cuda"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if stack == "reference":
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        from doge_cli.inference.decode import decoder_for

        weight_bytes = decoder_for(model).weight_bytes()
    # Per row and cached position: keys and values of every kv head, and one mask bias per kv head.
    per_position = config.num_hidden_layers * config.num_key_value_heads * (2 * head_dim(config) + 1) * \
        (2 if dtype == "bfloat16" else 4)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    def run(ids: torch.Tensor, tokens: int) -> torch.Tensor:
        if stack == "reference":
            return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        from doge_cli.inference import generate

        return generate(model, ids, max_new_tokens=tokens, stop_token_ids=[], compile=stack == "doge-compiled").sequences

    out = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prompt in prompts:
            for batch in batches:
                ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(model.device)
                run(ids, new if stack == "doge-compiled" else 4)  # warm-up (the compiled stack: its compiles)
                sync()
                t0 = time.perf_counter()
                run(ids, 1)
                sync()
                ttft = time.perf_counter() - t0
                t0 = time.perf_counter()
                seq = run(ids, new)
                sync()
                seconds = time.perf_counter() - t0
                assert seq.shape == (batch, prompt + new)
                cache_bytes = per_position * (prompt + new / 2)  # a row's reads at the reply's middle
                out[f"{prompt}x{batch}"] = {"tok_s": batch * new / seconds, "ttft_s": ttft,
                                            # None when the reply took no longer than its first token
                                            # (tiny models, a few tokens: timer noise), not a huge rate
                                            "decode_tok_s": (batch * (new - 1) / (seconds - ttft)
                                                             if seconds > ttft else None),
                                            "tokens": seq[:, prompt:].tolist(),
                                            "step_bytes": weight_bytes + batch * cache_bytes}
    out["peak_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["added_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    if not cuda:
        for row in out.values():
            if isinstance(row, dict):
                row["bandwidth"] = _bandwidth(int(row["step_bytes"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny run (1M size, short prompts) for tests")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory is then the GPU's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prompts, batches = ([8, 32], [1, 2]) if args.quick else ([32, 512], [1, 8])
    size = "1M" if args.quick else args.size
    if args.child:
        stack, dtype = args.child.split(":")
        print(json.dumps(_child(stack, size, dtype, prompts, batches, args.new, args.device)))
        return 0
    results: dict[tuple[str, str], list[dict]] = {}
    cpu = args.device == "cpu"
    stacks = ("reference", "doge") + (("doge-eager",) if not cpu else ("doge-torch",)) + (
        ("doge-compiled",) if cpu and not args.quick else ())
    precisions = PRECISIONS if cpu else PRECISIONS[:2]
    # int8 has no reference, and doge decodes it with the PyTorch step either way
    runs = [(stack, dtype) for dtype in precisions for stack in stacks
            if not (dtype == "int8" and stack in ("reference", "doge-torch"))]
    for _ in range(args.rounds):
        for stack, dtype in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{stack}:{dtype}", "--new", str(args.new),
                   "--size", args.size, "--device", args.device] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.setdefault((stack, dtype), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"device {args.device}; "
          f"Doge-{size}, greedy, {args.new} new tokens, medians of {args.rounds} alternating rounds")
    graphs = "doge-eager" in stacks
    bound = args.device == "cpu"
    print("| precision | prompt x batch | reference tok/s | doge tok/s | speed | vs reference fp32 |"
          + (" step MB | GB/s | bound tok/s | decode tok/s | of bound |" if bound else "")
          + " reference TTFT ms | doge TTFT ms | TTFT ratio | same tokens |"
          + (" doge eager tok/s | graphs speed-up | graphs = eager tokens |" if graphs else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|---|---|" if bound else "") + "---|---|---|---|"
          + ("---|---|---|" if graphs else ""))

    def med(rows: list[dict], key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rows)

    ratios, identical = [], True
    variants = ("doge", "doge-torch", "doge-compiled")
    labels = {"doge": "", "doge-torch": ", PyTorch step", "doge-compiled": ", compiled"}
    for dtype, variant in [(d, v) for d in precisions for v in variants if (v, d) in results]:
        ref, ours = results.get(("reference", dtype)), results[(variant, dtype)]
        for key in (f"{p}x{b}" for p in prompts for b in batches):
            batch = int(key.split("x")[1])
            d_tok, d_ttft = med(ours, key, "tok_s"), med(ours, key, "ttft_s") * 1000
            fp32_tok = med(results[("reference", "float32")], key, "tok_s")
            cells = [dtype + labels[variant], key]
            if ref is not None:
                r_tok, r_ttft = med(ref, key, "tok_s"), med(ref, key, "ttft_s") * 1000
                same = "yes" if all(a[key]["tokens"] == b[key]["tokens"] for a, b in zip(ref, ours)) else "no"
                if variant == "doge":
                    ratios.append(d_tok / r_tok)
                cells += [f"{r_tok:,.0f}", f"{d_tok:,.0f}", f"{d_tok / r_tok:.2f}x"]
            else:
                r_ttft, same = None, "-"
                cells += ["-", f"{d_tok:,.0f}", "-"]
            cells.append(f"{d_tok / fp32_tok:.2f}x")
            if bound:
                step = med(ours, key, "step_bytes")
                bandwidth = med(ours, key, "bandwidth")
                limit = batch * bandwidth / step
                rates = [r[key]["decode_tok_s"] for r in ours if r[key]["decode_tok_s"] is not None]
                decode = statistics.median(rates) if rates else None
                cells += [f"{step / 1e6:.1f}", f"{bandwidth / 1e9:.1f}", f"{limit:,.0f}",
                          f"{decode:,.0f}" if decode else "too short", f"{decode / limit:.0%}" if decode else "-"]
            cells += [f"{r_ttft:,.1f}" if r_ttft is not None else "-", f"{d_ttft:,.1f}",
                      f"{d_ttft / r_ttft:.2f}x" if r_ttft is not None else "-", same]
            if graphs and variant == "doge":
                eager = results[("doge-eager", dtype)]
                e_tok = med(eager, key, "tok_s")
                agree = all(a[key]["tokens"] == b[key]["tokens"] for a, b in zip(eager, ours))
                identical = identical and agree
                cells += [f"{e_tok:,.0f}", f"{d_tok / e_tok:.2f}x", "yes" if agree else "NO"]
            print("| " + " | ".join(cells) + " |")
        d_mem = statistics.median(r["peak_mib"] for r in ours)
        r_mem = statistics.median(r["peak_mib"] for r in ref) if ref is not None else None
        label = "GPU memory" if args.device != "cpu" else "RSS"
        print(f"| {cells[0]} | peak {label} MiB | {f'{r_mem:,.0f}' if r_mem else '-'} | {d_mem:,.0f} | "
              f"{f'{d_mem / r_mem:.2f}x' if r_mem else '-'} |")
    print(f"median speed ratio over all rows: {statistics.median(ratios):.2f}x")
    if graphs:
        print(f"CUDA graphs chose the same tokens as eager decoding in every row: {'yes' if identical else 'NO'}")
        return 0 if identical else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
