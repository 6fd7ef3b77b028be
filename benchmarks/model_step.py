"""Time a full training step (forward + backward + AdamW) of the Doge-20M shape, per attention backend.

Compares doge's backends with transformers' native DogeForCausalLM (sdpa) at 1x2048 and 4x512,
fp32 on CPU, and times generation (doge's KV-cache loop vs transformers' generate). Each model
runs in its own process so the peak RSS (ru_maxrss) belongs to it alone.

    .venv/bin/python benchmarks/model_step.py            # prints a markdown table (~3 min on 2 idle cores)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPES = [(4, 512), (1, 2048)]  # smaller first: ru_maxrss only grows, so each peak is then its own
WARMUP, STEPS = 2, 3


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(backend: str):
    import torch

    from doge_cli.model.sizes import size_config

    torch.manual_seed(0)
    config = size_config("Doge-20M")
    if backend == "native":
        from transformers import DogeForCausalLM

        model = DogeForCausalLM(config)
        model.set_attn_implementation("sdpa")
    else:
        from doge_cli.model import DogeForCausalLM

        model = DogeForCausalLM(config, attn_implementation=backend)
    return model


def run_one(backend: str) -> dict:
    """Step timings for one backend (in this process); generation timings too for sdpa/native."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model = _build(backend).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = {"backend": backend, "shapes": {}}
    base = _rss_mib()
    for batch, seq in SHAPES:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        times = []
        for i in range(WARMUP + STEPS):
            t0 = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        result["shapes"][f"{batch}x{seq}"] = {"tok_s": batch * seq / med, "step_s": med,
                                             "peak_mib": _peak_mib() - base}
    if backend in ("sdpa", "native"):
        result["generate"] = time_generation(model.eval(), backend)
    return result


def time_generation(model, backend: str, prompt_len: int = 32, new: int = 32) -> dict:
    import torch

    model.config.eos_token_id = None
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    out = {}
    for batch in (1, 4):
        ids = prompt.expand(batch, -1)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            if backend == "native":
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            else:
                from doge_cli.inference import generate

                generate(model, ids, max_new_tokens=new, stop_token_ids=[])
            times.append(time.perf_counter() - t0)
        out[f"batch{batch}"] = batch * new / statistics.median(times)
    return out


def main() -> None:
    import torch

    backends = ["native", "eager", "sdpa", "flex"]
    from doge_cli.kernels import is_available

    if is_available("cpu"):  # the kernel itself on a CPU only under triton's interpreter
        backends.append("triton")
    results = []
    start = time.time()
    for backend in backends:
        proc = subprocess.run([sys.executable, __file__, "--one", backend], capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{backend} done ({time.time() - start:.0f} s)", file=sys.stderr)
    native = results[0]
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, 2 threads, fp32, "
          f"{time.strftime('%Y-%m-%d')}; median of {STEPS} steps after {WARMUP} warm-up.\n")
    print("| model / backend | " + " | ".join(f"{s} tok/s (x native) | {s} peak MiB" for s in native["shapes"]) + " |")
    print("|---|" + "---|---|" * len(native["shapes"]))
    for r in results:
        name = "transformers native (sdpa)" if r["backend"] == "native" else f"doge {r['backend']}"
        cells = []
        for shape, m in r["shapes"].items():
            ratio = m["tok_s"] / native["shapes"][shape]["tok_s"]
            cells += [f"{m['tok_s']:.0f} ({ratio:.2f}x)", f"{m['peak_mib']:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nGeneration (greedy, prompt 32, 32 new tokens, KV cache), new tokens/s:\n")
    print("| generator | batch 1 | batch 4 |\n|---|---|---|")
    for r in results:
        if "generate" in r:
            name = "transformers generate (native sdpa)" if r["backend"] == "native" else "doge generate (sdpa)"
            print(f"| {name} | {r['generate']['batch1']:.0f} | {r['generate']['batch4']:.0f} |")
    print(f"\nTotal benchmark time {time.time() - start:.0f} s.", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2])))
    else:
        main()
