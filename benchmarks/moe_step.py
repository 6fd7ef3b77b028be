"""CDMoE training step: doge against transformers' native Doge with ``is_moe=True``, side by side.

Same config (the Doge-20M shape made CDMoE: 16,384 experts top 32, and a smaller 1,024 experts top 16),
same initial weights (doge's init loaded into the native model), same batch; one full training step =
forward, the next-token loss plus the router's load-balancing loss, backward, AdamW. doge computes the
loss as its trainer does (the fused linear cross-entropy, ``doge_cli.train.objectives.lm``); the native
model as transformers' Trainer would (``output_router_logits=True``, its own loss). Each (stack, experts)
pair runs in its own process, so its peak resident memory is its own; the dense Doge-20M step is timed
too, for the cost of MoE over dense. Figures: median step time over the steps after warm-up, tokens/s,
training memory (peak RSS minus the RSS once the model and optimizer exist), and the loss.

    .venv/bin/python benchmarks/moe_step.py [--batch 1] [--seq 2048] [--steps 3] [--quick]
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

WARMUP = 1


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _config(size: str, experts: int, top_k: int):
    from doge_cli.model.sizes import size_config

    config = size_config(size)
    if experts:
        config.is_moe, config.num_experts, config.num_experts_per_tok = True, experts, top_k
        config.output_router_logits = True  # transformers adds the router loss to its loss only then
    return config


def child(stack: str, size: str, experts: int, top_k: int, batch: int, seq: int, steps: int) -> dict:
    import warnings

    import torch

    from doge_cli.model import DogeForCausalLM

    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = _config(size, experts, top_k)
    ours = DogeForCausalLM(config, attn_implementation="sdpa")
    if stack == "reference":
        from transformers import DogeForCausalLM as Native

        model = Native(config)
        model.load_state_dict(ours.state_dict())  # strict: every tensor has its counterpart
        model.tie_weights()
        model.set_attn_implementation("sdpa")
        del ours
    else:
        model = ours
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if stack == "doge":
        from doge_cli.kernels.linear_cross_entropy import LossWorkspace
        from doge_cli.train.objectives.lm import causal_lm_loss_sum

        workspace = LossWorkspace()
        shifted = torch.cat([labels[:, 1:], torch.full((batch, 1), -100)], dim=1)

        def loss_fn():
            out = causal_lm_loss_sum(model, {"input_ids": ids}, shifted, workspace)
            return out.loss_sum / (shifted != -100).sum()
    else:
        def loss_fn():
            return model(input_ids=ids, labels=labels).loss

    base = _rss_mib()
    times, losses = [], []
    for step in range(WARMUP + steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = statistics.median(times)
    return {"step_s": step_s, "tok_s": batch * seq / step_s, "losses": losses,
            "train_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (1M size, 64 experts, short rows)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = "1M" if args.quick else args.size
    seq = 64 if args.quick else args.seq
    settings = [(64, 8)] if args.quick else [(16384, 32), (1024, 16)]
    if args.child:
        stack, experts, top_k = args.child.split(":")
        print(json.dumps(child(stack, size, int(experts), int(top_k), args.batch, seq, args.steps)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for experts, top_k in [*settings, (0, 0)]:
        for stack in ("reference", "doge"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{stack}:{experts}:{top_k}", "--size",
                   args.size, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            cmd += ["--quick"] if args.quick else []
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"{stack} with {experts} experts failed:\n{done.stderr[-3000:]}")
            results[(stack, experts)] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; Doge-{size} "
          f"shape, batch {args.batch} x {seq} tokens, fp32, median of {args.steps} steps after {WARMUP} warm-up")
    print("| experts (top k) | params | reference tok/s | doge tok/s | speed | reference training MiB | "
          "doge training MiB | memory | first loss (ref / doge) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for experts, top_k in [*settings, (0, 0)]:
        ref, ours = results[("reference", experts)], results[("doge", experts)]
        label = f"{experts:,} ({top_k})" if experts else "dense"
        print(f"| {label} | {ours['params'] / 1e6:.1f}M | {ref['tok_s']:,.0f} | {ours['tok_s']:,.0f} | "
              f"{ours['tok_s'] / ref['tok_s']:.2f}x | {ref['train_mib']:,.0f} | {ours['train_mib']:,.0f} | "
              f"{ours['train_mib'] / max(ref['train_mib'], 1e-9):.2f}x | {ref['losses'][0]:.4f} / {ours['losses'][0]:.4f} |")
    dense = results[("doge", 0)]["tok_s"]
    for experts, top_k in settings:
        print(f"doge: CDMoE with {experts:,} experts (top {top_k}) runs at {results[('doge', experts)]['tok_s'] / dense:.2f}x "
              "the dense step's tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
