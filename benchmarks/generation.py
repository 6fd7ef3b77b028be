"""Generation speed: doge's engine against transformers' ``generate`` on the native Doge, side by side.

Same weights (doge's init copied into transformers' model), Doge-20M shape by default, greedy, no early
stop (``min_new_tokens`` on the reference, no stop ids on doge). For each precision (fp32, bf16 weights),
prompt length (32, 512) and batch (1, 8): new tokens/s of a 64-token reply, time to first token (a
1-token reply: prefill and the first choice), and the peak resident memory of the process. Every
(stack, precision) pair runs in its own subprocess so its memory is its own; the two stacks alternate
per round and each figure is the median over the rounds. On a GPU a third stack, ``doge-eager``, decodes
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


def _child(stack: str, size: str, dtype: str, prompts: list[int], batches: list[int], new: int,
           device: str = "cpu") -> dict:
    import warnings

    import torch

    from doge_cli.model import DogeForCausalLM
    from doge_cli.model.sizes import size_config

    warnings.filterwarnings("ignore")
    if stack == "doge-eager":
        os.environ["DOGE_CUDA_GRAPHS"] = "0"
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
    model = model.to(device=device, dtype=getattr(torch, dtype))
    cuda = model.device.type == "cuda"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def run(ids: torch.Tensor, tokens: int) -> torch.Tensor:
        if stack == "reference":
            return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        from doge_cli.inference import generate

        return generate(model, ids, max_new_tokens=tokens, stop_token_ids=[]).sequences

    out = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prompt in prompts:
            for batch in batches:
                ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(model.device)
                run(ids, 4)  # warm-up
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
                out[f"{prompt}x{batch}"] = {"tok_s": batch * new / seconds, "ttft_s": ttft,
                                            "tokens": seq[:, prompt:].tolist()}
    out["peak_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["added_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
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
    stacks = ("reference", "doge") + (("doge-eager",) if args.device != "cpu" else ())
    for _ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):
            for stack in stacks:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{stack}:{dtype}", "--new", str(args.new),
                       "--size", args.size, "--device", args.device] + (["--quick"] if args.quick else [])
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results.setdefault((stack, dtype), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"device {args.device}; "
          f"Doge-{size}, greedy, {args.new} new tokens, medians of {args.rounds} alternating rounds")
    graphs = "doge-eager" in stacks
    print("| precision | prompt x batch | reference tok/s | doge tok/s | speed | reference TTFT ms | doge TTFT ms | "
          "TTFT ratio | same tokens |" + (" doge eager tok/s | graphs speed-up | graphs = eager tokens |" if graphs else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if graphs else ""))
    ratios, identical = [], True
    for dtype in ("float32", "bfloat16"):
        ref, ours = results[("reference", dtype)], results[("doge", dtype)]
        for key in (f"{p}x{b}" for p in prompts for b in batches):
            r_tok = statistics.median(r[key]["tok_s"] for r in ref)
            d_tok = statistics.median(r[key]["tok_s"] for r in ours)
            r_ttft = statistics.median(r[key]["ttft_s"] for r in ref) * 1000
            d_ttft = statistics.median(r[key]["ttft_s"] for r in ours) * 1000
            same = all(a[key]["tokens"] == b[key]["tokens"] for a, b in zip(ref, ours))
            ratios.append(d_tok / r_tok)
            extra = ""
            if graphs:
                eager = results[("doge-eager", dtype)]
                e_tok = statistics.median(r[key]["tok_s"] for r in eager)
                agree = all(a[key]["tokens"] == b[key]["tokens"] for a, b in zip(eager, ours))
                identical = identical and agree
                extra = f" {e_tok:,.0f} | {d_tok / e_tok:.2f}x | {'yes' if agree else 'NO'} |"
            print(f"| {dtype} | {key} | {r_tok:,.0f} | {d_tok:,.0f} | {d_tok / r_tok:.2f}x | {r_ttft:,.1f} | "
                  f"{d_ttft:,.1f} | {d_ttft / r_ttft:.2f}x | {'yes' if same else 'no'} |" + extra)
        r_mem = statistics.median(r["peak_mib"] for r in ref)
        d_mem = statistics.median(r["peak_mib"] for r in ours)
        print(f"| {dtype} | peak {'GPU memory' if args.device != 'cpu' else 'RSS'} MiB | {r_mem:,.0f} | {d_mem:,.0f} | {d_mem / r_mem:.2f}x | | | | |" + (" | | |" if graphs else ""))
    print(f"median speed ratio over all rows: {statistics.median(ratios):.2f}x")
    if graphs:
        print(f"CUDA graphs chose the same tokens as eager decoding in every row: {'yes' if identical else 'NO'}")
        return 0 if identical else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
