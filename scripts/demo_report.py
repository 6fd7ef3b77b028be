"""The five figures ``make demo`` promises, one per stage, read from the demo's own ``doge eval`` results.

Every figure is measured on held-out data (``doge data merge --test-examples 100``) by ``doge eval
--tasks builtin,stages --reference SFT_MODEL`` (see :mod:`doge_cli.eval.stages`):

1. pretraining: the base model's held-out word perplexity on the builtin corpus is below a unigram
   model's (fitted on the held-out text itself with add-one smoothing, an optimistic bar);
2. SFT: the held-out assistant-token loss of the SFT model is below the base model's;
3. DPO: DPO's implicit reward (log p/p_ref against the SFT model it started from) prefers the chosen
   reply of held-out pairs more often than not (``reward_accuracy`` > 0.5). Whether the DPO model
   itself gives the chosen reply the higher likelihood more often than the SFT model does
   (``accuracy``) is reported without a verdict: at this scale it barely moves (DPO 0.65-0.71 against
   SFT 0.63-0.69 in six demo runs of 2026-11-30), because the pairs' likelihoods differ by tens of nats
   (replies of different lengths) while DPO shifts them by about 5;
4. R1 distillation: the R1-SFT model answers held-out maths prompts in the thinking format (format
   reward, greedy) more than the DPO model;
5. GRPO: the GRPO model's held-out reward at the training temperature (format + accuracy, the
   functions it trained on, 4 samples per prompt) is above the R1-SFT model's. When the R1-SFT model's
   sampled replies are already in the format 90% of the time or more, GRPO has almost nothing left to
   win at this scale (the accuracy part, arithmetic, stays near zero for a 1M-parameter model), and the
   figure asks instead that GRPO keeps the reward: not below R1-SFT's by more than the larger standard
   error (the line then says "kept"). This is the demo since the R1 distillation trains with Muon
   (2026-12-06 run: R1-SFT sampled format 0.950, reward 0.988 ± 0.016; GRPO 1.001 ± 0.014, its training
   reward flat at 0.98-1.04 from its fifth step, also at 3x the learning rate).

A figure holds when the difference is larger than the larger standard error of the two figures
(perplexity has none and needs only to be lower). It also reports, without a verdict, the dense-to-MoE
continuation: the held-out loss of the upcycled CDMoE model after its continuation run against the
same continuation of the dense model (same steps, batches and evaluation batches), with each run's
speed. At the demo's scale and length the experts have little time to pay off; the figure says what
happened, whichever way it went.

    .venv/bin/python scripts/demo_report.py --runs ./runs/quickstart --eval-dir ./eval

It lives with the demo script (``scripts/demo.sh`` runs it): it is the demo's own check, not a doge
command. Exits 1 when a figure does not hold, so a demo that stops teaching fails loudly.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

STAGES = ("pt", "sft", "dpo", "r1-sft", "grpo")
SATURATED_FORMAT = 0.9  # R1-SFT's sampled format rate from which GRPO's figure asks it to keep the reward


@dataclass
class Figure:
    stage: str
    what: str
    value: float
    value_se: float
    versus: str
    other: float
    other_se: float
    higher_is_better: bool = True
    floor: float | None = None  # an absolute bar the value must also clear by its standard error
    verdict: bool = True  # False: reported, not judged
    keep: bool = False  # True: holds unless it is worse than the other by more than the larger error

    @property
    def holds(self) -> bool:
        if not self.verdict:
            return True
        margin = max(self.value_se, self.other_se)
        gain = self.value - self.other if self.higher_is_better else self.other - self.value
        if self.keep:
            return gain >= -margin
        return gain > margin and (self.floor is None or self.value - self.value_se > self.floor)

    def line(self) -> str:
        def show(v: float, se: float) -> str:
            return f"{v:,.1f}" if abs(v) >= 100 else (f"{v:.3f} ± {se:.3f}" if se else f"{v:.3f}")

        return (f"  {self.stage:<7} {self.what:<44} {show(self.value, self.value_se):>15}  vs {self.versus:<7} "
                f"{show(self.other, self.other_se):>15}  {self.mark}")

    @property
    def mark(self) -> str:
        return "(reported)" if not self.verdict else ("OK" if self.holds else "NOT MET")


def load_all(eval_dir: Path, runs: Path) -> dict[str, dict]:
    from doge_cli.eval.run import load_results, model_slug

    return {stage: load_results(eval_dir / f"{model_slug(str(runs / stage / 'final'))}.json") for stage in STAGES}


def metric(results: dict, task: str, key: str) -> tuple[float, float]:
    values = results["tasks"].get(task)
    if values is None or key not in values:
        raise SystemExit(f"demo_report: {results.get('model')} has no {task} {key}; run `doge eval --tasks "
                         "builtin,stages --reference SFT_MODEL` on it")
    return float(values[key]), float(values.get(f"{key}_stderr", 0.0))


def figures(results: dict[str, dict]) -> list[Figure]:
    pt = results["pt"]
    model_ppl, unigram = pt["tasks"]["heldout-ppl"], pt["baselines"]["heldout-ppl"]["unigram"]
    out = [Figure("pt", "held-out word perplexity (unigram as yardstick)", model_ppl["word_perplexity"], 0.0,
                  "unigram", unigram["word_perplexity"], 0.0, higher_is_better=False)]
    out.append(Figure("sft", "held-out assistant-token loss, nats/token", *metric(results["sft"], "sft-loss", "loss"),
                      "pt", *metric(pt, "sft-loss", "loss"), higher_is_better=False))
    out.append(Figure("dpo", "implicit-reward accuracy vs the SFT model", *metric(results["dpo"], "preference",
                                                                                "reward_accuracy"),
                      "chance", 0.5, 0.0, floor=0.5))
    out.append(Figure("dpo", "prefers the chosen reply (accuracy)", *metric(results["dpo"], "preference", "accuracy"),
                      "sft", *metric(results["sft"], "preference", "accuracy"), verdict=False))
    out.append(Figure("r1-sft", "thinking-format reward on maths, greedy",
                      *metric(results["r1-sft"], "math-reward", "format"), "dpo",
                      *metric(results["dpo"], "math-reward", "format")))
    saturated = metric(results["r1-sft"], "math-reward", "format_sampled")[0] >= SATURATED_FORMAT
    out.append(Figure("grpo", "maths reward at training temperature" + (", kept" if saturated else ""),
                      *metric(results["grpo"], "math-reward", "reward_sampled"), "r1-sft",
                      *metric(results["r1-sft"], "math-reward", "reward_sampled"), keep=saturated))
    return out


def continuation_figure(runs: Path) -> str | None:
    """One line comparing the continued MoE with the continued dense model (None when the demo did not run them)."""
    from doge_cli.report import load_run

    moe, dense = load_run(runs / "pt-moe", "moe"), load_run(runs / "pt-dense", "dense")
    if not (moe.exists and dense.exists):
        return None

    def last(run, key):
        values = [r[key] for r in run.records if isinstance(r.get(key), (int, float))]
        return values[-1] if values else None

    def speed(run):
        values = sorted(r["tokens_per_s"] for r in run.records if isinstance(r.get("tokens_per_s"), (int, float)))
        return values[len(values) // 2] if values else float("nan")

    moe_loss, dense_loss = last(moe, "eval_loss"), last(dense, "eval_loss")
    if moe_loss is None or dense_loss is None:
        return None
    steps = last(moe, "step")
    return (f"  dense -> MoE continuation, {steps} steps: held-out loss upcycled MoE {moe_loss:.4f} vs dense "
            f"{dense_loss:.4f} nats/token ({moe_loss - dense_loss:+.4f}); {speed(moe):,.0f} vs "
            f"{speed(dense):,.0f} tokens/s  (reported, no verdict)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--eval-dir", type=Path, default=Path("eval"))
    args = parser.parse_args(argv)

    shown = figures(load_all(args.eval_dir, args.runs))
    print("\nWhat each stage shows (held-out; a figure holds when it beats the other by more than a standard error; "
          "one marked \"kept\" when it is not worse by more than one)")
    for figure in shown:
        print(figure.line())
    moe_line = continuation_figure(args.runs)
    if moe_line:
        print(moe_line)
    return 0 if all(f.holds for f in shown) else 1


if __name__ == "__main__":
    sys.exit(main())
