"""`make gpu-check`: one command that proves the CUDA path on the GPU at hand, and prints one report.

Offline, about 8 minutes on one H100/H200. Each part runs in its own subprocess with a time limit; the
report lists every part as passed or FAILED with its figures, and the exit status is 1 when any failed.

1. kernels: ``benchmarks/kernels_gpu.py``: the Triton dynamic-mask kernel compiled (not the interpreter)
   in fp32 / bf16 / fp16 at head dims 64 and 128 against an fp64 reference, forward and backward, with the
   launch configurations this device picks (printed), then its speed against SDPA flash without bias,
   SDPA with the dense bias mask and compiled flex.
2. training: ``doge train pt --hardware auto`` on the builtin quickstart data (a 32k tokenizer trained
   here) at the Doge-20M and Doge-160M shapes, once per attention backend (triton, sdpa, flex): tokens/s,
   MFU, peak memory and the loss at the last step, which must agree across backends (within 5% in bf16).
3. reference: ``benchmarks/train_throughput.py --device cuda`` at Doge-20M: doge against transformers'
   native Doge trained by ``transformers.Trainer``, the ratio of tokens/s.
4. ZeRO-2: the Doge-20M sdpa run again under DeepSpeed ZeRO-2 on one process (accelerate); its loss must
   equal the plain run's within 2%.
5. generation: ``benchmarks/generation.py --device cuda``: new tokens/s at batch 1 and 8 against
   transformers' ``generate``, and doge with CUDA graphs against doge decoding eagerly (same tokens?).
6. graphs: ``tests/inference/test_graphs.py`` on the GPU: the captured decoding graphs choose, token for
   token, what eager decoding chooses (fp32 and bf16, continuous batching, cache growth).

Each part's section is printed as soon as it ends, so a run cut short still reports what it did.
``--parts`` picks parts (in the order given); ``--quick`` shrinks them for a short lease (the kernel's
speed budget 45 s, training at Doge-20M only, one generation round); ``--report FILE`` also writes the
report there.

``--smoke`` runs the same parts at tiny sizes on the CPU (the kernel under triton's interpreter, fp32,
a 1M model for a few steps) so the script cannot rot; a test runs it.

    python benchmarks/gpu_check.py [--smoke] [--quick] [--parts graphs,generation,...] [--keep DIR] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from doge_cli.config import presets

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("triton", "sdpa", "flex")


class Part:
    def __init__(self, name: str):
        self.name, self.ok, self.lines, self.seconds = name, True, [], 0.0

    def fail(self, why: str) -> None:
        self.ok = False
        self.lines.append(f"FAILED: {why}")


def _env(smoke: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DOGE_PLAIN_LOGS": "1"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the kernel on CPU, as the tests run it
    return env


def _run(cmd: list[str], smoke: bool, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(smoke), cwd=cwd, timeout=timeout)


def _doge(*args: str, smoke: bool, timeout: float = 600) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "doge_cli", *args], smoke, timeout)


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def kernels(smoke: bool, quick: bool = False) -> Part:
    part = Part("kernels: correctness (compiled, fp32/bf16/fp16, D 64/128) and speed")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py")] + \
        (["--smoke"] if smoke else ["--budget-s", "45" if quick else "120"])
    done = _run(cmd, smoke, timeout=420)
    out = done.stdout
    if done.returncode != 0 or "correctness: all passed" not in out:
        part.fail(f"kernels_gpu.py exited {done.returncode}: {_tail(out + done.stderr)}")
    part.lines += [ln for ln in out.splitlines() if ln.startswith(("launch", "device", "|", "##"))]
    return part


# The smoke run's training shape: size, steps, batch of 64-token rows (triton's interpreter runs ~5 tokens/s).
SMOKE_SHAPE = ("1M", 2, 2)


def prepare_data(root: Path, smoke: bool) -> tuple[Path, Path]:
    ds, tok = root / "datasets", root / "tokenizer"
    length = "64" if smoke else "2048"
    steps = [("data", "download", "--recipe", "quickstart", "--save-dir", str(ds)),
             ("data", "train-tokenizer", "--out", str(tok), "--vocab-size", "4096" if smoke else "32768",
              "--datasets-dir", str(ds)),
             ("data", "tokenize", "--tokenizer", str(tok), "--datasets-dir", str(ds), "--max-length", length,
              "--stage", "pt"),
             ("data", "merge", "--datasets-dir", str(ds), "--stage", "pt", "--test-examples", "8")]
    for args in steps:
        done = _doge(*args, smoke=smoke)
        if done.returncode != 0:
            raise RuntimeError(f"doge {' '.join(args[:2])} failed: {_tail(done.stderr)}")
    return ds / "merged" / "pt", tok


def train_run(data: Path, tok: Path, out: Path, size: str, backend: str, steps: int, batch: int, smoke: bool,
              accelerate_config: Path | None = None) -> dict:
    """``doge train pt`` once; its last metrics record (tokens/s and memory are medians over the logged steps)."""
    args = ["train", "pt", "--size", size, "--hardware", "auto", f"data.path={data}", f"data.tokenizer={tok}",
            f"output_dir={out}", f"train.max_steps={steps}", f"train.global_batch_size={batch}",
            f"runtime.micro_batch_size={batch}", f"runtime.attn_implementation={backend}",
            f"logging.log_every={max(1, steps // 10)}", "logging.eval_every=0", "checkpoint.every=0", "--overwrite"]
    if smoke:
        args += ["data.max_length=64", "model.max_position_embeddings=64", "model.keep_window_size=64"]
    if accelerate_config is not None:
        args += ["--accelerate-config", str(accelerate_config)]
    started = time.perf_counter()
    done = _doge(*args, smoke=smoke, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(_tail(done.stderr or done.stdout))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    config = yaml.safe_load((out / "config.yaml").read_text())
    # What doge's hardware presets expect this run to need (weights, gradients and AdamW state, activations).
    estimate = (16 * presets.parameter_estimate(config["model"]) + config["runtime"]["micro_batch_size"]
                * presets.activation_bytes_per_sequence(config["model"], config["data"]["max_length"],
                                                        config["runtime"]["gradient_checkpointing"])) / 2**30
    later = records[1:] or records  # the first logged window holds compilation and warm-up
    return {"loss": records[-1]["loss"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
            "mfu": statistics.median(r["mfu"] for r in later) if "mfu" in records[-1] else None,
            "mem_gb": max(r.get("mem_gb") or 0 for r in records), "attention": records[0].get("attention"),
            "estimate_gb": estimate,
            "seconds": time.perf_counter() - started, "log": done.stdout}


def training(root: Path, smoke: bool, quick: bool = False) -> tuple[Part, dict]:
    part = Part("training: doge train pt --hardware auto, every attention backend")
    runs: dict = {}
    try:
        data, tok = prepare_data(root, smoke)
    except RuntimeError as err:
        part.fail(str(err))
        return part, runs
    runs["data"] = (data, tok)
    shapes = [SMOKE_SHAPE] if smoke else [("20M", 100, 32)] + ([] if quick else [("160M", 50, 16)])
    tolerance = 0.01 if smoke else 0.05
    part.lines += ["| size | attention | steps x batch | tokens/s | MFU | peak memory GB | preset's estimate GB | "
                   "last loss |", "|---|---|---|---|---|---|---|---|"]
    for size, steps, batch in shapes:
        losses = {}
        for backend in BACKENDS:
            try:
                r = train_run(data, tok, root / "runs" / f"{size}-{backend}", size, backend, steps, batch, smoke)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                part.fail(f"{size} {backend}: {err}")
                continue
            runs[(size, backend)] = r
            losses[backend] = r["loss"]
            if r["attention"] != backend:
                part.fail(f"{size} {backend}: the run used {r['attention']}")
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            part.lines.append(f"| {size} | {backend} | {steps} x {batch} | {r['tokens_per_s']:,.0f} | {mfu} | "
                              f"{r['mem_gb']:.2f} | {r['estimate_gb']:.2f} | {r['loss']:.4f} |")
        if len(losses) > 1:
            spread = (max(losses.values()) - min(losses.values())) / min(losses.values())
            part.lines.append(f"{size}: last losses {spread:.2%} apart across backends (allowed {tolerance:.0%})")
            if spread > tolerance:
                part.fail(f"{size}: the backends' losses are {spread:.2%} apart")
    return part, runs


def reference(smoke: bool) -> Part:
    part = Part("reference: doge vs transformers' Doge + Trainer at Doge-20M")
    args = ["--size", "1M", "--seq-len", "64", "--steps", "4", "--precision", "fp32"] if smoke else \
        ["--size", "20M", "--seq-len", "2048", "--steps", "30", "--batch", "16", "--device", "cuda"]
    done = _run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), *args], smoke, timeout=600)
    if done.returncode != 0:
        part.fail(f"train_throughput.py exited {done.returncode}: {_tail(done.stderr)}")
    part.lines += [ln for ln in done.stdout.splitlines() if ln.startswith(("|", "median", "Doge"))]
    return part


def zero2(root: Path, smoke: bool, runs: dict) -> Part:
    part = Part("ZeRO-2: DeepSpeed on one process against the plain run")
    size, steps, batch = SMOKE_SHAPE if smoke else ("20M", 100, 32)
    plain = runs.get((size, "sdpa"))
    if plain is None or "data" not in runs:
        part.fail("no plain sdpa run to compare with (see training)")
        return part
    launcher = root / "zero2-one-process.yaml"
    launcher.write_text((ROOT / "configs" / "accelerate" / "zero2.yaml").read_text()
                        .replace("num_processes: 2", "num_processes: 1")
                        .replace("configs/accelerate/ds_zero2.json", str(ROOT / "configs" / "accelerate" / "ds_zero2.json")))
    data, tok = runs["data"]
    try:
        r = train_run(data, tok, root / "runs" / f"{size}-zero2", size, "sdpa", steps, batch, smoke, launcher)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        part.fail(str(err))
        return part
    apart = abs(r["loss"] - plain["loss"]) / plain["loss"]
    part.lines.append(f"{size}, {steps} steps: last loss {r['loss']:.4f} (ZeRO-2) vs {plain['loss']:.4f} (plain), "
                      f"{apart:.2%} apart; {r['tokens_per_s']:,.0f} vs {plain['tokens_per_s']:,.0f} tokens/s")
    if apart > 0.02:
        part.fail(f"ZeRO-2's loss is {apart:.2%} from the plain run's")
    return part


def generation(smoke: bool, quick: bool = False) -> Part:
    part = Part("generation: doge's engine vs transformers' generate; CUDA graphs vs eager decoding")
    args = ["--quick", "--rounds", "1", "--new", "8"] if smoke else ["--rounds", "1" if quick else "2", "--device", "cuda"]
    done = _run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), *args], smoke, timeout=420)
    if done.returncode != 0:
        part.fail(f"generation.py exited {done.returncode}: {_tail(done.stderr)}")
    part.lines += [ln for ln in done.stdout.splitlines() if ln.startswith(("|", "median", "machine", "CUDA graphs"))]
    return part


def graphs(smoke: bool) -> Part:
    part = Part("graphs: the CUDA-graph decoding step against eager decoding (tests/inference/test_graphs.py)")
    # The smoke run leaves out the torch.compile'd CPU step (half a minute of compiling, and the test suite
    # runs it anyway); on a GPU every test of the file runs.
    select = ["-k", "not compiled_cpu_step"] if smoke else []
    done = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *select,
                 str(ROOT / "tests" / "inference" / "test_graphs.py")], smoke, timeout=300)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    part.lines.append(f"pytest: {summary}")
    if done.returncode != 0:
        part.fail(f"pytest exited {done.returncode}: {_tail(done.stdout + done.stderr, 30)}")
    elif not smoke and "skipped" in summary:
        part.fail("the GPU tests were skipped")
    return part


PARTS = ("kernels", "training", "reference", "zero2", "generation", "graphs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (triton's interpreter)")
    parser.add_argument("--keep", help="keep the data and runs in this folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="shorter parts, for a short GPU lease")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, run in this order ({', '.join(PARTS)})")
    parser.add_argument("--report", help="also write the report to this file")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        print(f"gpu-check: unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA GPU here; run it where one is (or `make gpu-check SMOKE=1` for the CPU "
                  "smoke run)", file=sys.stderr)
            return 2
        device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        device = "CPU smoke run (triton interpreter, tiny sizes; figures mean nothing)"
    started = time.perf_counter()
    report = [f"## gpu-check on {device}" + (" (--quick)" if args.quick else "") + "\n"]

    def emit(text: str) -> None:
        print(text, flush=True)
        report.append(text)
        if args.report:
            Path(args.report).write_text("\n".join(report) + "\n")

    emit(report.pop())
    with tempfile.TemporaryDirectory(prefix="doge-gpu-check-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        parts: list[Part] = []
        runs: dict = {}
        makers = {"kernels": lambda: kernels(args.smoke, args.quick),
                  "training": lambda: training(root, args.smoke, args.quick),
                  "reference": lambda: reference(args.smoke),
                  "zero2": lambda: zero2(root, args.smoke, runs),
                  "generation": lambda: generation(args.smoke, args.quick),
                  "graphs": lambda: graphs(args.smoke)}
        for name in chosen:
            t0 = time.perf_counter()
            result = makers[name]()
            part = result[0] if isinstance(result, tuple) else result
            if name == "training":
                runs.update(result[1])
            part.seconds = time.perf_counter() - t0
            parts.append(part)
            emit(f"### {part.name}: {'passed' if part.ok else 'FAILED'} ({part.seconds:.0f} s)\n\n"
                 + "\n".join(part.lines) + "\n")
    failed = [p.name for p in parts if not p.ok]
    emit(f"gpu-check: {len(parts) - len(failed)}/{len(parts)} parts passed in {time.perf_counter() - started:.0f} s"
         + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
