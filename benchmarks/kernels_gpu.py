"""Correctness and speed of the Triton dynamic-mask attention kernel on one GPU (about 5 minutes on an H100).

1. Correctness: fresh random inputs (GQA, packed documents, padding, top-k window, lengths that
   are not block multiples) in fp32 / bf16 / fp16, head dims 64 and 128. Output and the gradients
   of q, k, v and bias are compared with an fp64 computation of the reference; every kernel
   output starts as NaN, so an element never written fails the check. Error = max|x - x64| /
   max|x64|; a case passes when it is below a per-dtype bound or at most 2x the error of the
   plain-PyTorch path computed in the same dtype (the error any unfused implementation has).
2. Speed: forward and forward+backward, bf16, causal, against
   - SDPA flash (causal, no bias): the speed to match;
   - SDPA with the dense (B, H, Q, K) bias mask: transformers' native Doge path;
   - flex_attention (compiled) with a score_mod adding the bias and a causal block mask;
   for sequence lengths 512, 2048, 8192 at 16384 tokens per batch, head dims 64 and 128 with
   2048 / head_dim heads. Median of many runs after warm-up, timed with CUDA events.
   TFLOP/s counts the matmuls, halved for causal (backward = 2.5x forward), the convention of
   FlashAttention benchmarks.
3. A markdown table to paste into benchmarks/RESULTS.md.

    python benchmarks/kernels_gpu.py            # on a CUDA GPU
    python benchmarks/kernels_gpu.py --smoke    # tiny sizes on CPU under TRITON_INTERPRET=1 (a test runs this)

Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _setup(smoke: bool):
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
    import torch

    from doge_cli.kernels import _dma_triton, is_available
    from doge_cli.kernels.dma_attention import attention_flops, dma_attention, dma_attention_reference

    device = torch.device("cpu" if smoke else "cuda")
    if not is_available(device):
        sys.exit(f"the Triton kernel cannot run on {device} (need a CUDA GPU with compute capability >= 8.0)")
    return torch, device, _dma_triton, dma_attention, dma_attention_reference, attention_flops


def _rel_err(x, ref) -> float:
    x = x.double()
    if not bool(x.isfinite().all()):
        return float("nan")
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check_correctness(torch, device, kmod, dma_attention, dma_attention_reference, smoke: bool) -> bool:
    tol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (4e-3, 1e-2)}
    dtypes = [torch.float32, torch.bfloat16] + ([] if smoke else [torch.float16])
    if smoke:
        shapes = [(1, 2, 1, 21, 37, 16, 9), (1, 2, 2, 19, 19, 32, None)]
    else:
        # (B, Hq, Hkv, Tq, Tk, D, keep_window_size)
        shapes = [(2, 4, 2, 1000, 1000, 64, None), (2, 4, 1, 777, 1000, 128, 300), (1, 2, 2, 1, 515, 64, 128)]
    ok_all = True
    with kmod.unwritten_as_nan():  # an element the kernels never write shows up as NaN
        print("## correctness (relative max error vs fp64; 'torch' = the PyTorch path in the same dtype)")
        print("| dtype | shape B,Hq,Hkv,Tq,Tk,D | keep | tensor | kernel err | torch err | pass |")
        print("|---|---|---|---|---|---|---|")
        for dtype in dtypes:
            for B, Hq, Hkv, Tq, Tk, D, keep in shapes:
                g = torch.Generator(device="cpu").manual_seed(B * 1000 + Tq + D)
                mk = lambda *s, g=g: torch.randn(*s, generator=g).to(device)  # noqa: E731
                q, k, v = mk(B, Hq, Tq, D), mk(B, Hkv, Tk, D), mk(B, Hkv, Tk, D)
                bias = mk(B, Hkv, Tk).exp()  # Doge's bias is exp(...) > 0
                grad_out = mk(B, Hq, Tq, D)
                doc_ids = torch.cumsum(torch.rand(B, Tk, generator=g) < 4.0 / Tk, dim=1).to(device)
                kpm = torch.ones(B, Tk, dtype=torch.bool, device=device)
                kpm[0, : Tk // 10] = False
                kw = dict(scale=D**-0.5, doc_ids=doc_ids, key_padding_mask=kpm, keep_window_size=keep)

                def run(fn, cast, kw=kw, tensors=(q, k, v, bias), grad_out=grad_out):
                    xs = [t.to(cast).requires_grad_() for t in tensors]
                    out = fn(*xs, **kw)
                    return [out, *torch.autograd.grad(out, xs, grad_out.to(cast))]

                want = run(dma_attention_reference, torch.float64)
                got = run(dma_attention, dtype)
                base = run(dma_attention_reference, dtype)
                for name, a, b, w, bound in zip(("out", "dq", "dk", "dv", "dbias"), got, base, want,
                                                (tol[dtype][0],) + (tol[dtype][1],) * 4, strict=True):
                    err, base_err = _rel_err(a, w), _rel_err(b, w)
                    ok = err == err and (err <= bound or err <= 2 * base_err)
                    ok_all &= ok
                    print(f"| {str(dtype)[6:]} | {B},{Hq},{Hkv},{Tq},{Tk},{D} | {keep} | {name} | {err:.2e} | "
                          f"{base_err:.2e} | {'ok' if ok else 'FAIL'} |")
    return ok_all


def _timer(torch, device):
    def measure(fn, reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def _methods(torch, dma_attention, compile_flex: bool):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def triton_dma(q, k, v, bias):
        return dma_attention(q, k, v, bias, scale=q.shape[-1] ** -0.5, doc_ids=None, key_padding_mask=None,
                             keep_window_size=None)

    def sdpa_flash(q, k, v, bias):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_dense_bias(q, k, v, bias):
        # transformers' Doge: the per-key bias expanded to (B, H, Q, K) and masked, every call.
        T = q.shape[-2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = bias[:, :, None, :].expand(-1, -1, T, -1).masked_fill(~causal, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Uncompiled flex is a slow reference loop; only the compiled one is worth timing (on a GPU).
    flex_fn = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    block_masks = {}

    def flex(q, k, v, bias):
        T = q.shape[-2]
        key = (T, q.device)
        if key not in block_masks:
            block_masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T,
                                                 device=q.device)

        def score_mod(score, b, h, qi, ki):
            return score + bias[b, h, ki]

        return flex_fn(q, k, v, score_mod=score_mod, block_mask=block_masks[key])

    return {"sdpa flash, no bias": sdpa_flash, "triton dma (ours)": triton_dma,
            "sdpa dense bias mask": sdpa_dense_bias, "flex_attention": flex}


def bench_speed(torch, device, dma_attention, attention_flops, smoke: bool, budget_s: float) -> list[str]:
    measure = _timer(torch, device)
    methods = _methods(torch, dma_attention, compile_flex=not smoke)
    if smoke:
        dtype, seqlens, head_dims, tokens, width, reps, warmup = torch.bfloat16, (40,), (16,), 40, 32, 1, 1
    else:
        dtype, seqlens, head_dims, tokens, width, reps, warmup = torch.bfloat16, (512, 2048, 8192), (64, 128), 16384, 2048, 20, 3
    start = time.perf_counter()
    rows = []
    for D in head_dims:
        for T in seqlens:
            B, H = max(1, tokens // T), width // D
            g = torch.Generator(device="cpu").manual_seed(T + D)
            mk = lambda *s, g=g: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
            q, k, v = mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D)
            bias = mk(B, H, T).float().exp().to(dtype)
            grad_out = mk(B, H, T, D)
            fwd_flops = attention_flops(B, H, T, T, D, causal=True)
            flash_ms = None
            for name, fn in methods.items():
                if time.perf_counter() - start > budget_s:
                    rows.append(f"| {T} | {D} | {name} | skipped (time budget) | | | | |")
                    continue
                xs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
                try:
                    with torch.no_grad():
                        fwd_ms = measure(lambda fn=fn, xs=xs: fn(*xs), reps, warmup)

                    def step(fn=fn, xs=xs, grad_out=grad_out):
                        for x in xs:
                            x.grad = None
                        fn(*xs).backward(grad_out)

                    both_ms = measure(step, reps, warmup)
                except Exception as err:  # a baseline that cannot run here (CPU flex backward, OOM)
                    rows.append(f"| {T} | {D} | {name} | n/a: {type(err).__name__} | | | | |")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if name.startswith("sdpa flash"):
                    flash_ms = both_ms
                vs_flash = f"{flash_ms / both_ms:.2f}" if flash_ms else ""
                rows.append(f"| {T} | {D} | {name} | {fwd_ms:.3f} | {fwd_flops / fwd_ms / 1e9:.1f} | "
                            f"{both_ms:.3f} | {3.5 * fwd_flops / both_ms / 1e9:.1f} | {vs_flash} |")
                del xs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def print_launch_configs(torch, device) -> None:
    """The launch configurations this device picks (doge_cli.kernels.launch), first choice first."""
    from doge_cli.kernels import launch

    if device.type != "cuda":
        print(f"launch configs: {launch.INTERPRETER} for everything (triton's interpreter)")
        return
    props = torch.cuda.get_device_properties(device)
    print(f"launch configs for {launch.shared_memory_limit(props):,} bytes of shared memory per block "
          f"(sm_{props.major}{props.minor}):")
    for kind in launch.KINDS:
        for head_dim in (64, 128):
            for dtype in (torch.float32, torch.bfloat16):
                chosen = launch.choose(kind, head_dim, dtype, props)
                need = launch.shared_memory_bytes(kind, chosen[0], head_dim, dtype)
                print(f"launch {kind} D={head_dim} {str(dtype).removeprefix('torch.')}: {chosen[0]} "
                      f"(~{need:,} bytes)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop starting new speed measurements after this many seconds")
    p.add_argument("--skip-correctness", action="store_true")
    args = p.parse_args(argv)
    torch, device, kmod, dma_attention, reference, attention_flops = _setup(args.smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    print_launch_configs(torch, device)
    print()
    t0 = time.perf_counter()
    ok = True
    if not args.skip_correctness:
        ok = check_correctness(torch, device, kmod, dma_attention, reference, args.smoke)
        print(f"\ncorrectness: {'all passed' if ok else 'FAILED'} ({time.perf_counter() - t0:.0f} s)\n")
    rows = bench_speed(torch, device, dma_attention, attention_flops, args.smoke, args.budget_s)
    print(f"## attention speed on {name}, bf16, causal, 16384 tokens per batch, 2048/D heads"
          if not args.smoke else "## attention speed (smoke: tiny sizes, interpreter; numbers mean nothing)")
    print("| T | D | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | speed vs sdpa flash (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
