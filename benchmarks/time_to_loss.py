"""Time to quality, end to end: the wall time doge needs to reach the held-out loss that the reference
stack reaches after N steps, on the same data and machine.

- reference: transformers' native ``DogeForCausalLM`` (sdpa) trained by ``transformers.Trainer`` with
  AdamW at the Doge-20M recipe's learning rate (8e-3) and its warmup-stable-decay schedule (10% linear
  warmup, 10% linear decay), bf16 autocast as the SmallDoge pt.py runs it (``--precision``: on a CPU
  without native bf16 (AVX512-BF16 or AMX) both stacks train in fp32, as doge's ``cpu`` hardware preset
  does, because emulated bf16 is several times slower there), for N steps.
- doge: ``doge train pt`` with its best optimizer and recipe (``optim.name muon`` at ``--muon-lr``, the
  AdamW part at the recipe's 8e-3; the same schedule shape), for M = N/2, N/3, N/4, N/6 ... steps, each a
  complete run with its own warmup and decay, until one no longer reaches the reference's loss. The
  figure is the wall time of the shortest run that does.
- also doge with AdamW for the full N steps (the same optimizer as the reference): its time against the
  reference's is the throughput part of the ratio, and its tokens/s against the Muon runs' is the cost
  of Muon's step at this shape.

Every run starts from the same initial weights (doge's init, saved once), reads the same shuffled
blocks of the builtin corpus in the same order (the first M·batch of them), and is scored by one
evaluator outside both stacks: transformers' ``DogeForCausalLM`` in fp32 on the same held-out blocks
(mean token cross-entropy). Wall time is the time of the training call in a fresh process (the data
and weights are on disk before it starts): setup, every step, and saving the final model.

    python benchmarks/time_to_loss.py [--steps 240] [--seq-len 2048] [--batch 1] [--muon-lr 0.02]
        [--sweep-muon-lrs 0.0025,0.005,0.01,0.02 [--sweep-steps M] [--sweep-seeds S] [--sweep-only]]

With ``--sweep-muon-lrs`` doge's Muon rate is chosen first, on separate draws of the data and initial
weights (``--sweep-seeds`` of them, never the held-out blocks that judge the comparison; the lowest mean
loss wins, reported with its standard error), and the comparison runs at the best one (``--sweep-only``:
stop after the sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = 48  # held-out blocks
SCHEDULE = {"warmup_ratio": 0.1, "decay_ratio": 0.1}


def make_data(root: Path, size: str, seq_len: int, rows: int, seed: int) -> None:
    """A BPE tokenizer on the builtin corpus, ``rows`` shuffled training blocks, HELD_OUT held-out blocks,
    and the initial weights at the size preset's shape."""
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from doge_cli.config import resolve_config
    from doge_cli.data.builtin import pretraining_texts
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.train.objectives.pt import PretrainObjective

    preset_vocab = resolve_config("pt", size=size, hardware="cpu").model.vocab_size
    texts = list(pretraining_texts())
    random.Random(seed).shuffle(texts)  # every source in the training and held-out blocks
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts[:6000], trainers.BpeTrainer(
        vocab_size=min(8192, preset_vocab), special_tokens=["<|end_of_text|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.save_pretrained(root / "tokenizer")
    need = (rows + HELD_OUT) * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(fast(text)["input_ids"] + [fast.eos_token_id])
        if len(ids) >= need:
            break
    if len(ids) < need:
        sys.exit(f"the builtin corpus gives {len(ids):,} tokens; {need:,} are needed (fewer --steps)")
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(rows + HELD_OUT)]
    random.Random(seed + 1).shuffle(blocks)
    # One document per block: both stacks see the same causal attention over the whole block.
    pos = [list(range(seq_len))]
    DatasetDict({"train": Dataset.from_dict({"input_ids": blocks[:rows], "position_ids": pos * rows}),
                 "test": Dataset.from_dict({"input_ids": blocks[rows:], "position_ids": pos * HELD_OUT})}
                ).save_to_disk(str(root / "data"))
    (root / "data" / "manifest.json").write_text(json.dumps({"tokenizer": str(root / "tokenizer")}))
    cfg = resolve_config("pt", size=size, hardware="cpu", overrides=[f"data.path={root / 'data'}",
                                                                     f"data.max_length={seq_len}"])
    obj = PretrainObjective(cfg)
    obj.tokenizer = fast
    hf = obj.hf_config()
    hf.vocab_size = cfg.model.vocab_size  # the preset's 32k head, which costs what it costs in the recipe
    torch.manual_seed(seed)
    save_pretrained(DogeForCausalLM(hf, attn_implementation="eager"), root / "init")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_doge(root: Path, out: Path, size: str, seq_len: int, steps: int, batch: int, optimizer: str,
               muon_lr: float, lr: float, precision: str) -> dict:
    from doge_cli.config import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives.pt import PretrainObjective

    overrides = [
        f"data.path={root / 'data'}", f"data.max_length={seq_len}", f"output_dir={out}", f"init_from={root / 'init'}",
        f"train.max_steps={steps}", f"train.global_batch_size={batch}", f"runtime.micro_batch_size={batch}",
        f"runtime.precision={precision}", "logging.log_every=10", "logging.eval_every=0", "checkpoint.every=0",
        "data.eval_split=none", "schedule.name=warmup_stable_decay", f"schedule.warmup_ratio={SCHEDULE['warmup_ratio']}",
        f"schedule.decay_ratio={SCHEDULE['decay_ratio']}", "schedule.min_lr_rate=0", f"optim.name={optimizer}",
        f"optim.lr={lr}", f"optim.muon_lr={muon_lr}",
    ]
    cfg = resolve_config("pt", size=size, hardware="cpu", overrides=overrides)
    started = time.perf_counter()
    train(cfg, PretrainObjective(cfg), overwrite=True)
    wall = time.perf_counter() - started
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "final": str(out / "final"),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records)}


def train_reference(root: Path, out: Path, size: str, seq_len: int, steps: int, batch: int, lr: float,
                    precision: str) -> dict:
    import torch
    from datasets import load_from_disk
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from doge_cli.config import resolve_config
    from doge_cli.train.core import data_order

    cfg = resolve_config("pt", size=size, hardware="cpu")
    data = load_from_disk(str(root / "data"))["train"]
    order = data_order(cfg.train.seed, 0, len(data))[: steps * batch].tolist()  # doge's order (seed, epoch 0)
    data = data.select(order).map(lambda r: {"labels": r["input_ids"]}).remove_columns(["position_ids"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(root / "init", attn_implementation="sdpa", dtype=torch.float32)

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.optim.max_grad_norm,
        lr_scheduler_type="warmup_stable_decay", warmup_steps=round(SCHEDULE["warmup_ratio"] * steps),
        lr_scheduler_kwargs={"num_decay_steps": round(SCHEDULE["decay_ratio"] * steps), "decay_type": "linear",
                             "min_lr_ratio": 0.0},
        logging_steps=10, save_strategy="no", report_to=[], bf16=precision == "bf16", use_cpu=True, dataloader_num_workers=0,
        seed=cfg.train.seed, disable_tqdm=True,
    )
    trainer = InOrder(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(out / "final"))
    AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(out / "final")
    wall = time.perf_counter() - started
    return {"wall_s": wall, "final": str(out / "final"), "tokens_per_s": steps * batch * seq_len / wall}


def held_out_loss(root: Path, model_dir: str) -> float:
    """Mean token cross-entropy on the held-out blocks: transformers' Doge in fp32 (the judge of both)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    rows = load_from_disk(str(root / "data"))["test"]["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            logits = model(ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def child(args) -> None:
    import accelerate  # noqa: F401  (imports before the clock, as for both stacks)
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import doge_cli.train.core  # noqa: F401

    root, out = Path(args.root), Path(args.out)
    if args.child == "reference":
        result = train_reference(root, out, args.size, args.seq_len, args.steps, args.batch, args.lr,
                                 args.precision)
    else:
        result = train_doge(root, out, args.size, args.seq_len, args.steps, args.batch, args.child, args.muon_lr,
                            args.lr, args.precision)
    result["held_out_loss"] = held_out_loss(root, result["final"])
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, root: Path, side: str, steps: int) -> dict:
    out = root / f"{side}-{steps}"
    cmd = [sys.executable, __file__, "--child", side, "--root", str(root), "--out", str(out), "--size", args.size,
           "--seq-len", str(args.seq_len), "--steps", str(steps), "--batch", str(args.batch),
           "--lr", str(args.lr), "--muon-lr", str(args.muon_lr), "--precision", args.precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DOGE_PLAIN_LOGS": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{side} run of {steps} steps failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[7:])
    print(f"{side:>9} {steps:>4} steps: {result['wall_s']:7.1f} s, held-out loss {result['held_out_loss']:.4f}, "
          f"{result['tokens_per_s']:,.0f} tokens/s", flush=True)
    return result


def rate_list(text: str) -> list[float]:
    """'0.005,0.01' -> [0.005, 0.01] (argparse reports a ValueError as "invalid rate_list value")."""
    return [float(x) for x in text.split(",")]


def sweep_muon_lr(args) -> float:
    """Choose doge's Muon rate by held-out loss on draws that the comparison does not use (data seeds 1 ..
    ``--sweep-seeds``: each another tokenizer sample, shuffle, held-out blocks and initial weights), so that
    the rate is not tuned on the blocks that judge the comparison. Returns the rate of the lowest mean loss."""
    steps = args.sweep_steps or max(1, round(args.steps / 3))
    losses: dict[float, list[float]] = {rate: [] for rate in args.sweep_muon_lrs}
    for seed in range(1, args.sweep_seeds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, args.size, args.seq_len, rows=steps * args.batch, seed=seed)
            print(f"sweep of muon_lr on a separate draw (data seed {seed}), {steps} steps each:", flush=True)
            for rate in args.sweep_muon_lrs:
                args.muon_lr = rate
                print(f"  muon_lr {rate:g}: ", end="", flush=True)
                losses[rate].append(run_child(args, root, "muon", steps)["held_out_loss"])
    means = {rate: statistics.mean(v) for rate, v in losses.items()}
    best = min(means, key=means.get)

    def mean_se(values: list[float], sign: str = "") -> str:  # the standard error only where there are 2+ draws
        text = f"{statistics.mean(values):{sign}.4f}"
        return text + (f" ({statistics.stdev(values) / len(values) ** 0.5:.4f})" if len(values) > 1 else "")

    print(f"sweep over {args.sweep_seeds} draw(s): mean held-out loss (standard error); against the best, the "
          "mean of the per-draw differences (its standard error):", flush=True)
    for rate in losses:
        diffs = [a - b for a, b in zip(losses[rate], losses[best])]
        print(f"  muon_lr {rate:g}: {mean_se(losses[rate])}"
              + ("  <- best" if rate == best else f"  {mean_se(diffs, '+')}"))
    print("SWEEP " + json.dumps({"steps": steps, "seeds": args.sweep_seeds,
                                 "losses": {str(r): v for r, v in losses.items()}, "best": best}))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20M")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=240, help="N: the reference's steps (~10 min on this CPU)")
    parser.add_argument("--lr", type=float, default=8e-3, help="AdamW rate (the Doge-20M recipe's)")
    parser.add_argument("--muon-lr", type=float, default=0.02, help="doge's Muon rate")
    parser.add_argument("--sweep-muon-lrs", default=[], type=rate_list,
                        help="comma-separated Muon rates to choose --muon-lr from first, on a separate draw "
                             "(other initial weights, shuffle and held-out blocks), at --sweep-steps")
    parser.add_argument("--sweep-steps", type=int, default=0, help="steps of each sweep run (default N/3)")
    parser.add_argument("--sweep-seeds", type=int, default=1,
                        help="draws (data seeds 1, 2, ...) each sweep rate runs on; the best mean loss wins")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep (no comparison)")
    parser.add_argument("--divisors", default="2,3,4,6",
                        help="doge runs of N/d steps, in this order (d may be fractional: 1.5 is 2N/3)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="both stacks' precision; auto: bf16 where the CPU has it natively, else fp32")
    parser.add_argument("--child", choices=["reference", "adamw", "muon"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16() else "fp32"
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.sweep_seeds < 1 or (args.sweep_only and not args.sweep_muon_lrs):
        parser.error("--sweep-seeds must be at least 1, and --sweep-only needs --sweep-muon-lrs")
    from doge_cli.config.presets import SIZES, normalize_size

    if normalize_size(args.size) is None:
        parser.error(f"unknown --size {args.size!r}; sizes: {', '.join(SIZES)}")
    if args.sweep_muon_lrs:
        args.muon_lr = sweep_muon_lr(args)
        if args.sweep_only:
            return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.size, args.seq_len, rows=args.steps * args.batch, seed=0)
        print(f"Doge-{args.size} shape, seq {args.seq_len}, batch {args.batch}, {args.precision}; reference N = {args.steps} "
              f"steps; doge Muon at muon_lr {args.muon_lr:g} (AdamW part {args.lr:g})", flush=True)
        ref = run_child(args, root, "reference", args.steps)
        adamw = run_child(args, root, "adamw", args.steps)
        reached = None
        muon_runs = []
        for d in [float(x) for x in args.divisors.split(",")]:
            steps = max(1, round(args.steps / d))
            result = run_child(args, root, "muon", steps)
            muon_runs.append((steps, result))
            if result["held_out_loss"] > ref["held_out_loss"]:
                break
            reached = (steps, result)
        if reached is None:  # not even at N/2: try the full N
            result = run_child(args, root, "muon", args.steps)
            muon_runs.append((args.steps, result))
            if result["held_out_loss"] <= ref["held_out_loss"]:
                reached = (args.steps, result)
    print(f"\nreference loss after {args.steps} steps: {ref['held_out_loss']:.4f} in {ref['wall_s']:.0f} s")
    print(f"doge AdamW, same {args.steps} steps: loss {adamw['held_out_loss']:.4f} in {adamw['wall_s']:.0f} s "
          f"({ref['wall_s'] / adamw['wall_s']:.2f}x faster)")
    muon_speed = statistics.median(r["tokens_per_s"] for _, r in muon_runs)
    print(f"training tokens/s at this shape: AdamW {adamw['tokens_per_s']:,.0f}, Muon {muon_speed:,.0f} "
          f"(Muon / AdamW {muon_speed / adamw['tokens_per_s']:.2f}x)")
    if reached is None:
        print("doge Muon did not reach the reference's loss within N steps")
        ratio = None
    else:
        steps, result = reached
        ratio = ref["wall_s"] / result["wall_s"]
        print(f"doge Muon reaches it in {steps} steps ({steps / args.steps:.0%} of the tokens) and "
              f"{result['wall_s']:.0f} s: time to loss {ratio:.2f}x faster than the reference")
    print("RESULT " + json.dumps({"reference": ref, "adamw": adamw, "muon": muon_runs, "ratio": ratio}))


if __name__ == "__main__":
    main()
