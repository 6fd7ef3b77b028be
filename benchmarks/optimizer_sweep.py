"""AdamW against Muon (``optim.name``) on the quickstart pipeline, at equal tokens, over seeds and a
learning-rate sweep for each: held-out loss after pretraining, then after SFT.

Pretraining is ``configs/quickstart/pt.yaml`` (the ~1M-parameter Doge, 400 steps x 8 x 256 tokens) as
shipped but for the optimizer keys, ``train.seed`` (initial weights and data order), no periodic
checkpoints, and a larger held-out evaluation at the end (``logging.eval_batches``). With Muon the
AdamW part (embeddings, head, norms, dynamic mask) keeps the recipe's ``optim.lr`` and ``optim.muon_lr``
is swept. SFT is ``configs/quickstart/sft.yaml`` from each seed's pretrained model of the optimizer's
best pretraining rate, with the same optimizer; its rate (``optim.lr`` for AdamW, ``optim.muon_lr`` for
Muon) is swept too. Reported per setting: mean held-out loss over the seeds with its standard error
(sample standard deviation / sqrt(seeds)), and the median training tokens/s.

Needs the quickstart data and tokenizer of ``make demo`` (``--demo-dir``, default ./demo). Each finished
run is kept in ``--work`` and its figures in ``--work/results.json``, so an interrupted sweep goes on
where it stopped when run again.

    python benchmarks/optimizer_sweep.py [--seeds 3] [--demo-dir demo] [--work /tmp/doge-optimizer-sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def run_stage(stage: str, config: str, out: Path, overrides: list[str], demo: Path) -> dict:
    """One ``doge train`` run (skipped when ``out`` already finished); its final figures."""
    metrics = out / "metrics.jsonl"
    if not (out / "final" / "model.safetensors").is_file():
        cmd = [sys.executable, "-m", "doge_cli", "train", stage, str(ROOT / "configs" / "quickstart" / config),
               f"output_dir={out}", "checkpoint.every=0", "--overwrite", *overrides]
        env = {**os.environ, "DOGE_PLAIN_LOGS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, cwd=demo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    final = records[-1]
    return {"eval_loss": final["eval_loss"], "train_loss": final["loss"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "train_s": sum(r.get("train_s", 0.0) for r in records), "tokens": sum(r.get("tokens", 0) for r in records)}


def summary(runs: list[dict]) -> dict:
    losses = [r["eval_loss"] for r in runs]
    sem = statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 else float("nan")
    return {"mean": statistics.fmean(losses), "sem": sem, "n": len(losses), "losses": losses,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs)}


def rate_key(name: str) -> str:
    return "optim.lr" if name == "adamw" else "optim.muon_lr"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "demo")
    parser.add_argument("--work", type=Path, default=Path("/tmp/doge-optimizer-sweep"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--adamw-lrs", type=floats, default=floats("1.5e-3,3e-3,6e-3,1.2e-2"))
    parser.add_argument("--muon-lrs", type=floats, default=floats("0.01,0.02,0.04,0.08"))
    parser.add_argument("--sft-adamw-lrs", type=floats, default=floats("5e-4,1e-3,2e-3"))
    parser.add_argument("--sft-muon-lrs", type=floats, default=floats("2.5e-3,5e-3,1e-2"))
    parser.add_argument("--eval-batches", type=int, default=40, help="held-out micro-batches at the end of a run")
    parser.add_argument("--skip-sft", action="store_true")
    args = parser.parse_args(argv)
    demo = args.demo_dir.resolve()
    if not (demo / "datasets" / "merged" / "pt").is_dir() or not (demo / "datasets" / "merged" / "sft").is_dir():
        sys.exit(f"{demo}/datasets/merged/{{pt,sft}} not found: run `make demo` first (or pass --demo-dir)")
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, args.seeds + 1))
    results: dict = {"pt": {}, "sft": {}, "seeds": seeds}
    sweeps = {"adamw": args.adamw_lrs, "muon": args.muon_lrs}
    for name, rates in sweeps.items():
        for rate in rates:
            runs = []
            for seed in seeds:
                out = args.work / f"pt-{name}-{rate:g}-s{seed}"
                runs.append(run_stage("pt", "pt.yaml", out, [
                    f"data.path={demo / 'datasets' / 'merged' / 'pt'}", f"train.seed={seed}", f"optim.name={name}",
                    f"{rate_key(name)}={rate}", "logging.eval_every=0", f"logging.eval_batches={args.eval_batches}"],
                    demo))
                print(f"pt {name} {rate_key(name)}={rate:g} seed {seed}: held-out loss {runs[-1]['eval_loss']:.4f}",
                      flush=True)
            results["pt"][f"{name} {rate:g}"] = {"optimizer": name, "rate": rate, **summary(runs)}
    best = {name: min((v for v in results["pt"].values() if v["optimizer"] == name), key=lambda v: v["mean"])
            for name in sweeps}
    sft_rates = {"adamw": args.sft_adamw_lrs, "muon": args.sft_muon_lrs}
    for name in ([] if args.skip_sft else sweeps):
        for rate in sft_rates[name]:
            runs = []
            for seed in seeds:
                start = args.work / f"pt-{name}-{best[name]['rate']:g}-s{seed}" / "final"
                out = args.work / f"sft-{name}-{best[name]['rate']:g}-{rate:g}-s{seed}"
                runs.append(run_stage("sft", "sft.yaml", out, [
                    f"init_from={start}", f"data.path={demo / 'datasets' / 'merged' / 'sft'}", f"train.seed={seed}",
                    f"optim.name={name}", f"{rate_key(name)}={rate}", "logging.eval_every=0",
                    f"logging.eval_batches={args.eval_batches // 2}"], demo))
                print(f"sft {name} {rate_key(name)}={rate:g} seed {seed}: held-out loss {runs[-1]['eval_loss']:.4f}",
                      flush=True)
            results["sft"][f"{name} {rate:g}"] = {"optimizer": name, "rate": rate, "pt_rate": best[name]["rate"],
                                                  **summary(runs)}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    for stage in ("pt", "sft"):
        if not results[stage]:
            continue
        print(f"\n{stage}: held-out loss, mean ± standard error over {len(seeds)} seeds")
        print("| optimizer | rate swept | held-out loss | median tokens/s |")
        print("|---|---|---|---|")
        for v in results[stage].values():
            print(f"| {v['optimizer']} | {rate_key(v['optimizer'])} {v['rate']:g} | {v['mean']:.4f} ± {v['sem']:.4f} | "
                  f"{v['tokens_per_s']:,.0f} |")
        winners = {name: min((v for v in results[stage].values() if v["optimizer"] == name), key=lambda v: v["mean"])
                   for name in sweeps if any(v["optimizer"] == name for v in results[stage].values())}
        if len(winners) == 2:
            a, m = winners["adamw"], winners["muon"]
            gap = a["mean"] - m["mean"]
            err = math.hypot(a["sem"], m["sem"])
            print(f"best AdamW ({a['rate']:g}) - best Muon ({m['rate']:g}): {gap:+.4f} ± {err:.4f} "
                  f"({gap / err:+.1f} standard errors)")
    print(f"\nresults: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
