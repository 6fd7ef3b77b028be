"""Pretraining throughput: doge vs the reference stack, side by side in one run.

(a) reference: transformers' native ``DogeForCausalLM`` (sdpa) trained by ``transformers.Trainer``,
    as the SmallDoge pt.py does;
(b) doge: ``doge_cli.train.core.train`` with the pretraining objective.

Both get the same model shape (Doge-20M by default), the same initial weights (doge's init
copied into the native model), the same rows in the same order, the same optimizer settings and
precision, and a constant learning rate (the two libraries count warmup steps differently: a
schedule would put them a step apart and blur the loss comparison). Each side runs in its own subprocess so peak memory (ru_maxrss) is its
own. Both sides time a step as the wall time from the end of one step to the end of the next (data,
forward/backward, optimizer, logging). Reported: median tokens/s over the steps after warm-up, peak RSS, training memory (peak RSS
minus the RSS after importing both stacks: model, optimizer state, activations and logits), loss
at the last step, and the doge/reference ratios.

    python benchmarks/train_throughput.py [--size 20M] [--seq-len 2048] [--steps 12] [--precision bf16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def make_data(root: Path, size: str, seq_len: int, rows: int, seed: int) -> None:
    """Token blocks cut from the builtin corpus (tokenized with a small BPE) and the initial weights."""
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from doge_cli.config import resolve_config
    from doge_cli.data.builtin import pretraining_texts
    from doge_cli.model import DogeForCausalLM, save_pretrained
    from doge_cli.train.objectives.pt import PretrainObjective

    preset_vocab = resolve_config("pt", size=size, hardware="cpu").model.vocab_size
    texts = [t for _, t in zip(range(4000), pretraining_texts())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(8192, preset_vocab), special_tokens=["<|end_of_text|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.save_pretrained(root / "tokenizer")
    ids = []
    for text in texts:
        ids.extend(fast(text)["input_ids"] + [fast.eos_token_id])
        if len(ids) >= rows * seq_len:
            break
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(len(ids) // seq_len)][:rows]
    # One document per block keeps both stacks on exactly the same attention pattern.
    data = Dataset.from_dict({"input_ids": blocks, "position_ids": [list(range(seq_len))] * len(blocks)})
    DatasetDict({"train": data}).save_to_disk(str(root / "data"))
    (root / "data" / "manifest.json").write_text(json.dumps({"tokenizer": str(root / "tokenizer")}))

    cfg = resolve_config("pt", size=size, hardware="cpu", overrides=[f"data.path={root / 'data'}",
                                                                     f"data.max_length={seq_len}"])
    obj = PretrainObjective(cfg)
    obj.tokenizer = fast
    # The model keeps the preset's 32k vocabulary so the head costs what it costs in the recipe.
    hf = obj.hf_config()
    hf.vocab_size = cfg.model.vocab_size
    torch.manual_seed(seed)
    save_pretrained(DogeForCausalLM(hf, attn_implementation="eager"), root / "init")


def run_doge(root: Path, size: str, seq_len: int, steps: int, batch: int, precision: str, attn: str,
             device: str = "cpu") -> dict:
    from doge_cli.config import resolve_config
    from doge_cli.train.core import train
    from doge_cli.train.objectives.pt import PretrainObjective

    out = root / "doge-run"
    overrides = [
        f"data.path={root / 'data'}", f"data.max_length={seq_len}", f"output_dir={out}", f"init_from={root / 'init'}",
        f"train.max_steps={steps}", f"train.global_batch_size={batch}", f"runtime.micro_batch_size={batch}",
        f"runtime.precision={precision}", f"runtime.attn_implementation={attn}", "logging.log_every=1",
        "logging.eval_every=0", "checkpoint.every=0", "schedule.name=constant_with_warmup", "schedule.warmup_ratio=0",
    ]
    cfg = resolve_config("pt", size=size, hardware="cpu" if device == "cpu" else "auto", overrides=overrides)
    cfg.data.eval_split = "none"
    train(cfg, PretrainObjective(cfg), overwrite=True)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": [r["tokens_per_s"] for r in records], "losses": [r["loss"] for r in records]}


def run_reference(root: Path, size: str, seq_len: int, steps: int, batch: int, precision: str,
                  device: str = "cpu") -> dict:
    import torch
    from datasets import load_from_disk
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from doge_cli.config import resolve_config
    from doge_cli.train.core import data_order

    cfg = resolve_config("pt", size=size, hardware="cpu")
    data = load_from_disk(str(root / "data"))["train"]
    # The same rows in the same order as doge's loop (seed, epoch 0).
    order = data_order(cfg.train.seed, 0, len(data))[: steps * batch].tolist()
    data = data.select(order).map(lambda r: {"labels": r["input_ids"]}).remove_columns(["position_ids"])
    model = AutoModelForCausalLM.from_pretrained(root / "init", attn_implementation="sdpa", dtype=torch.float32)

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        # Wall time from one step's end to the next: data loading, forward/backward, optimizer and
        # logging, the same span doge's per-step log window covers (log_every=1).
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t0)
            self.t0 = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(root / "ref-run"), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], bf16=precision == "bf16", use_cpu=device == "cpu",
        dataloader_num_workers=0, seed=cfg.train.seed, disable_tqdm=True,
    )
    InOrder(model=model, args=args, train_dataset=data, callbacks=[Timer()]).train()
    tokens = batch * seq_len
    return {"tokens_per_s": [tokens / t for t in times], "losses": losses}


def current_rss_gb() -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def child(args) -> None:
    root = Path(args.root)
    # Both stacks import the same libraries first, so "training memory" (peak minus this) compares
    # what each needs for the model, optimizer, activations and logits, without the shared imports.
    import accelerate  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import doge_cli.train.core  # noqa: F401

    baseline = current_rss_gb()
    if args.child == "doge":
        result = run_doge(root, args.size, args.seq_len, args.steps, args.batch, args.precision, args.attn, args.device)
    else:
        result = run_reference(root, args.size, args.seq_len, args.steps, args.batch, args.precision, args.device)
    if args.device == "cuda":  # the GPU's peak allocation is the memory that matters there
        result["peak_rss_gb"] = result["train_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["train_mem_gb"] = result["peak_rss_gb"] - baseline
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20M")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--attn", default="auto", help="doge attention backend")
    parser.add_argument("--repeats", type=int, default=1, help="alternating reference/doge rounds (medians)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: both stacks on the GPU (memory columns are then the GPU's peak allocation)")
    parser.add_argument("--child", choices=["doge", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.size, args.seq_len, rows=args.steps * args.batch + 8, seed=0)
        rounds = []
        for _ in range(args.repeats):  # reference and doge alternate, so slow spells hit both
            results = {}
            for side in ("reference", "doge"):
                cmd = [sys.executable, __file__, "--child", side, "--root", str(root), "--size", args.size,
                       "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--batch", str(args.batch),
                       "--precision", args.precision, "--attn", args.attn, "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "DOGE_PLAIN_LOGS": "1"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
                results[side] = json.loads(line[7:])
            rounds.append(results)
    print(f"\nDoge-{args.size}, seq {args.seq_len}, batch {args.batch}, {args.steps} steps, {args.precision}, "
          f"median after {WARMUP} warm-up steps, {args.repeats} alternating round(s)")
    # On a GPU both memory columns are the peak of torch.cuda.max_memory_allocated (the process's GPU memory).
    peak = "peak GPU memory (GB)" if args.device != "cpu" else "peak RSS (GB)"
    print(f"| round | stack | tokens/s | {peak} | training memory (GB) | loss at last step |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for i, results in enumerate(rounds, 1):
        rows = {}
        for side, res in results.items():
            rows[side] = (statistics.median(res["tokens_per_s"][WARMUP:]), res["peak_rss_gb"], res["train_mem_gb"],
                          res["losses"][-1])
            speed, mem, train_mem, loss = rows[side]
            print(f"| {i} | {side} | {speed:,.0f} | {mem:.2f} | {train_mem:.2f} | {loss:.4f} |")
        ref, doge = rows["reference"], rows["doge"]
        ratios.append((doge[0] / ref[0], doge[1] / ref[1], doge[2] / ref[2], abs(doge[3] - ref[3]) / ref[3]))
        print(f"| {i} | doge / reference | {ratios[-1][0]:.2f}x | {ratios[-1][1]:.2f}x | {ratios[-1][2]:.2f}x | "
              f"{ratios[-1][3]:.2%} apart |")
    print("losses per step (last round):", {k: [round(x, 4) for x in v["losses"]] for k, v in rounds[-1].items()})
    med = [statistics.median(r[k] for r in ratios) for k in range(4)]
    print(f"median over rounds, doge / reference: speed {med[0]:.2f}x, {peak.split(' (')[0]} {med[1]:.2f}x, "
          f"training memory {med[2]:.2f}x, loss {med[3]:.2%} apart")


if __name__ == "__main__":
    main()
