#!/usr/bin/env bash
# The first thing to run: a 9M-parameter LLaMA trains for 30 updates on local C4 shards, on the CPU,
# with APOLLO-Mini, in a few minutes (3 min 50 s measured on a busy 2-core machine); then the run folder
# holds config.json, metrics.jsonl, a checkpoint.
#   DATA_DIR   folder of C4 json.gz shards (default ../shared/data/c4 beside the checkout)
#   TOKENIZER  tokenizer name or folder (default ../shared/data/t5-base if present, else t5-base)
#   OPTIMIZER  any --optimizer name (default apollo_mini)
# Extra flags are forwarded: "$@" (e.g. --num_training_steps 100 --optimizer adamw).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=${DATA_DIR:-../shared/data/c4}
if [[ -z "${TOKENIZER:-}" ]]; then
    TOKENIZER=t5-base
    [[ -d ../shared/data/t5-base ]] && TOKENIZER=../shared/data/t5-base
fi
exec python -m train --model_config configs/llama_9m.json --data_dir "$DATA_DIR" --tokenizer "$TOKENIZER" \
    --optimizer "${OPTIMIZER:-apollo_mini}" --lr 0.01 --single_gpu --dtype float32 \
    --batch_size 8 --total_batch_size 8 --max_length 128 --num_training_steps 30 --warmup_steps 3 \
    --eval_every 15 --eval_tokens 20000 --save_every 30 --workers 0 --wandb "${WANDB_MODE:-offline}" \
    --save_dir "${SAVE_DIR:-runs/cpu_smoke}" "$@"
