#!/usr/bin/env bash
# Small-scale study on the real C4 sample: AdamW, APOLLO, APOLLO-Mini and GaLore on LLaMA-9M, three learning
# rates each, same seed and same data order; the best lr per optimizer is compared (docs/study_cpu_first.md).
# A benchmark, not a test: about 60-90 minutes on 2 CPU cores with the defaults.
#
# Environment (defaults):
#   DATA_DIR ../shared/data/c4   TOKENIZER ../shared/data/t5-base   OUT runs/study_cpu   DOC docs/study_cpu_first.md
#   OPTIMIZERS "adamw apollo apollo_mini galore"
#   ADAMW_LRS 2.5e-3,5e-3,1e-2   APOLLO_LRS 5e-3,1e-2,2e-2   MINI_LRS 5e-3,1e-2,2e-2   GALORE_LRS 5e-3,1e-2,2e-2
#   STEPS 120  BATCH 16  MAX_LENGTH 256  (token budget per run = STEPS x BATCH x MAX_LENGTH, packed sequences)
#   EVAL_EVERY 30  EVAL_TOKENS 50000  WARMUP 12
#   PROJ_GAP 40: low-rank projections are redrawn every 40 updates (the default 200 would never refresh in a
#   120-update run, turning GaLore and APOLLO into a study of the step-1 subspace)
#   CHECKS "lr=1e-3 lr=2.5e-3,eps=1e-6": extra AdamW runs (comma-separated flag=value sets) that test the
#   reading: a smaller lr than the grid's, and APOLLO's epsilon (1e-6) instead of torch's 1e-8. "" skips them.
# Runs already finished are skipped and interrupted ones resumed (train.sweep), so the study can be re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-../shared/data/c4}
TOKENIZER=${TOKENIZER:-../shared/data/t5-base}
OUT=${OUT:-runs/study_cpu}
DOC=${DOC:-docs/study_cpu_first.md}
OPTIMIZERS=${OPTIMIZERS:-adamw apollo apollo_mini galore}
STEPS=${STEPS:-120} BATCH=${BATCH:-16} MAX_LENGTH=${MAX_LENGTH:-256}
EVAL_EVERY=${EVAL_EVERY:-30} EVAL_TOKENS=${EVAL_TOKENS:-50000} WARMUP=${WARMUP:-12} PROJ_GAP=${PROJ_GAP:-40}

lrs_for() {
    case $1 in
        adamw) echo "${ADAMW_LRS:-2.5e-3,5e-3,1e-2}" ;;
        apollo) echo "${APOLLO_LRS:-5e-3,1e-2,2e-2}" ;;
        apollo_mini) echo "${MINI_LRS:-5e-3,1e-2,2e-2}" ;;
        galore) echo "${GALORE_LRS:-5e-3,1e-2,2e-2}" ;;
        *) echo "error: no learning rates for optimizer $1" >&2; exit 2 ;;
    esac
}

for optimizer in $OPTIMIZERS; do
    lowrank=()
    [[ $optimizer == adamw ]] || lowrank=(--update_proj_gap "$PROJ_GAP")
    python -m train.sweep train --sweep_dir "$OUT/$optimizer" --lr "$(lrs_for "$optimizer")" \
        --optimizer "$optimizer" --model_config configs/llama_9m.json --data_dir "$DATA_DIR" --tokenizer "$TOKENIZER" \
        --max_length "$MAX_LENGTH" --packing --batch_size "$BATCH" --total_batch_size "$BATCH" --num_training_steps "$STEPS" \
        --warmup_steps "$WARMUP" --eval_every "$EVAL_EVERY" --eval_tokens "$EVAL_TOKENS" --save_every "$STEPS" \
        --seed 42 --dtype float32 --single_gpu --workers 0 --wandb "${WANDB_MODE:-offline}" "${lowrank[@]}"
done

CHECKS=${CHECKS-lr=1e-3 lr=2.5e-3,eps=1e-6}
for check in $CHECKS; do
    name="adamw-${check//=/}"; name=${name//,/-}
    run_dir="$OUT/checks/$name"
    [[ -d $run_dir/$(printf 'step_%07d' "$STEPS") ]] && continue  # finished already
    rm -rf "$run_dir"
    flags=()
    IFS=, read -ra pairs <<< "$check"
    for pair in "${pairs[@]}"; do flags+=("--${pair%%=*}" "${pair#*=}"); done
    python -m train --optimizer adamw "${flags[@]}" --save_dir "$run_dir" --name "$name" \
        --model_config configs/llama_9m.json --data_dir "$DATA_DIR" --tokenizer "$TOKENIZER" \
        --max_length "$MAX_LENGTH" --packing --batch_size "$BATCH" --total_batch_size "$BATCH" --num_training_steps "$STEPS" \
        --warmup_steps "$WARMUP" --eval_every "$EVAL_EVERY" --eval_tokens "$EVAL_TOKENS" --save_every "$STEPS" \
        --seed 42 --dtype float32 --single_gpu --workers 0 --wandb "${WANDB_MODE:-offline}"
done
if [[ -n $CHECKS ]]; then
    python -m train.compare "$OUT"/adamw/train-*/ "$OUT"/checks/adamw-*/ --out "$OUT/checks" \
        --title "AdamW checks: LLaMA-9M, $STEPS updates"
fi

runs=()
for optimizer in $OPTIMIZERS; do runs+=("$OUT/$optimizer"/train-*/); done
python -m train.compare "${runs[@]}" --out "$OUT" --best_per optimizer --title "LLaMA-9M on the C4 sample, $STEPS updates"

mkdir -p "$(dirname "$DOC")"
# a hand-written "## Reading" section at the end of an existing document is kept (re-read it after a re-run)
reading=""
[[ -f $DOC ]] && reading=$(sed -n '/^## Reading/,$p' "$DOC")
png="${DOC%.md}.png"
cp "$OUT/perplexity.png" "$png"
tokens=$(( STEPS * BATCH * MAX_LENGTH ))
{
    echo "# CPU study: LLaMA-9M on the C4 sample"
    echo
    echo "Reproduce: \`$(printf '%q ' env OPTIMIZERS="$OPTIMIZERS" STEPS="$STEPS" BATCH="$BATCH" MAX_LENGTH="$MAX_LENGTH" PROJ_GAP="$PROJ_GAP" bash scripts/study_cpu.sh)\`"
    echo
    echo "Budget per run: $STEPS updates x $BATCH sequences x $MAX_LENGTH positions = $tokens tokens"
    echo "(packed; the train sample holds 471,535 tokens: about $(python -c "print(f'{$tokens / 471535:.2f}')") passes)."
    echo "Same seed (42) and data order for every run; validation on $EVAL_TOKENS tokens every $EVAL_EVERY updates."
    echo
    echo "![validation perplexity]($(basename "$png"))"
    echo
    cat "$OUT/comparison.md"
    if [[ -n $CHECKS ]]; then
        echo
        echo "## Checks: AdamW with a smaller lr and with APOLLO's epsilon"
        echo
        echo "Extra AdamW runs (\`CHECKS=\"$CHECKS\"\`), same budget, seed and data, beside the grid's AdamW runs:"
        echo
        cat "$OUT/checks/comparison.md"
    fi
    if [[ -n $reading ]]; then
        echo
        echo "$reading"
    fi
} > "$DOC"
echo "wrote $DOC and $png" >&2
