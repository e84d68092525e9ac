#!/usr/bin/env bash
# The first thing to run: a 9M-parameter LLaMA trains for 30 updates on C4, on the CPU, with APOLLO-Mini,
# in a few minutes (3 min 50 s measured on a busy 2-core machine on local shards); then the run folder
# holds config.json, metrics.jsonl, a checkpoint.
#   DATA_DIR   folder of C4 json.gz shards (default ../shared/data/c4 beside the checkout when it exists,
#              else C4 streams from the Hugging Face hub, allenai/c4)
#   TOKENIZER  tokenizer name or folder (default ../shared/data/t5-base if present, else t5-base from the hub)
#   OPTIMIZER  any --optimizer name (default apollo_mini)
# Extra flags are forwarded: "$@" (e.g. --num_training_steps 100 --optimizer adamw).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOCAL_SAMPLE=../shared/data
from_hub=""
if [[ -z "${DATA_DIR+set}" ]]; then
    DATA_DIR=""
    if [[ -d $LOCAL_SAMPLE/c4 ]]; then DATA_DIR=$LOCAL_SAMPLE/c4; else from_hub="C4 (allenai/c4)"; fi
fi
if [[ -z "${TOKENIZER:-}" ]]; then
    TOKENIZER=t5-base
    if [[ -d $LOCAL_SAMPLE/t5-base ]]; then TOKENIZER=$LOCAL_SAMPLE/t5-base; else from_hub="${from_hub:+$from_hub and }the t5-base tokenizer"; fi
fi
if [[ -n $from_hub ]]; then
    echo "cpu_smoke: no local sample in $LOCAL_SAMPLE: streaming $from_hub from the Hugging Face hub" >&2
fi
status=0
python -m train --model_config configs/llama_9m.json ${DATA_DIR:+--data_dir "$DATA_DIR"} --tokenizer "$TOKENIZER" \
    --optimizer "${OPTIMIZER:-apollo_mini}" --lr 0.01 --single_gpu --dtype float32 \
    --batch_size 8 --total_batch_size 8 --max_length 128 --num_training_steps 30 --warmup_steps 3 \
    --eval_every 15 --eval_tokens 20000 --save_every 30 --workers 0 --wandb "${WANDB_MODE:-offline}" \
    --save_dir "${SAVE_DIR:-runs/cpu_smoke}" "$@" || status=$?
if [[ $status -ne 0 && -n $from_hub ]]; then
    echo "cpu_smoke: without the hub, point DATA_DIR at a folder of c4-train.*.json.gz / c4-validation.*.json.gz" \
         "shards and TOKENIZER at a t5-base tokenizer folder" >&2
fi
exit "$status"
