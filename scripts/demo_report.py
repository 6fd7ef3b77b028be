"""The two figures ``make demo`` promises, computed from the demo's own outputs.

1. The pretrained model's held-out perplexity on the builtin corpus against a unigram model's
   (from ``doge eval``'s results JSON of the pretrained model; the unigram is fitted on the
   held-out text itself with add-one smoothing, an optimistic bar).
2. The held-out assistant-token loss of the SFT model against the base model's, on the test split
   of the merged SFT data.

It also reports, without a verdict, the dense-to-MoE continuation: the held-out loss of the upcycled
CDMoE model after its continuation run against the same continuation of the dense model (same steps,
batches and evaluation batches), with each run's speed. At the demo's scale and length the experts have
little time to pay off; the figure says what happened, whichever way it went.

    .venv/bin/python scripts/demo_report.py --datasets-dir ./datasets --runs ./runs/quickstart --eval-dir ./eval

It lives with the demo script (``scripts/demo.sh`` runs it): it is the demo's own check, not a doge command.

Exits 1 when either promise is not met, so a demo that stops teaching fails loudly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def perplexity_figure(eval_dir: Path, base_model: Path) -> tuple[dict, dict]:
    from doge_cli.eval.run import load_results, model_slug

    results = load_results(eval_dir / f"{model_slug(str(base_model))}.json")
    model = results["tasks"]["heldout-ppl"]
    unigram = results["baselines"]["heldout-ppl"]["unigram"]
    return model, unigram


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
    parser.add_argument("--datasets-dir", type=Path, default=Path("datasets"))
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--eval-dir", type=Path, default=Path("eval"))
    args = parser.parse_args(argv)

    from doge_cli.eval import sft_loss

    base = args.runs / "pt" / "final"
    sft = args.runs / "sft" / "final"
    model_ppl, unigram_ppl = perplexity_figure(args.eval_dir, base)
    data = args.datasets_dir / "merged" / "sft"
    base_loss = sft_loss.assistant_token_loss(str(base), str(data))
    tuned_loss = sft_loss.assistant_token_loss(str(sft), str(data))

    ok_ppl = model_ppl["word_perplexity"] < unigram_ppl["word_perplexity"]
    ok_sft = tuned_loss["loss"] < base_loss["loss"]
    print("\nWhat the demo shows")
    print(f"  held-out word perplexity, builtin corpus: pretrained {model_ppl['word_perplexity']:,.1f} "
          f"vs unigram {unigram_ppl['word_perplexity']:,.1f} (bits/byte {model_ppl['bits_per_byte']:.3f} vs "
          f"{unigram_ppl['bits_per_byte']:.3f})  {'OK' if ok_ppl else 'NOT MET'}")
    print(f"  held-out assistant-token loss ({tuned_loss['tokens']:,} tokens): SFT {tuned_loss['loss']:.3f} "
          f"vs base {base_loss['loss']:.3f} nats/token  {'OK' if ok_sft else 'NOT MET'}")
    moe_line = continuation_figure(args.runs)
    if moe_line:
        print(moe_line)
    return 0 if ok_ppl and ok_sft else 1


if __name__ == "__main__":
    sys.exit(main())
