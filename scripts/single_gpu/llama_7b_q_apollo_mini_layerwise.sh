#!/usr/bin/env bash
# LLaMA-7B pretraining on one GPU (PROTOCOL.md, last recipe row "7b single GPU"): APOLLO-Mini (rank 1,
# tensor scaling, scale 128) with int8 attention/MLP weights (groups of 128, stochastic rounding) and
# layer-wise updates; micro-batch 1 and no gradient accumulation (layer-wise updates cannot accumulate),
# 150000 updates, 15000 warmup, lr 0.01, pure bf16 as published (--state_dtype param: bf16 optimizer states).
# Memory (python -m train.memory, docs/memory.md): 10.4 GB estimated; 11.95 GB with float32 states.
#
# Environment (published defaults):
#   DATA_DIR    folder of C4 json.gz shards (default: unset = stream allenai/c4 from the hub)
#   TOKENIZER   tokenizer name or folder (default t5-base)
#   WANDB_MODE  online | offline | disabled (default online)
#   PRINT_COMMAND=1 prints the launch command instead of running it
# Extra flags are forwarded and win: "$@" (e.g. --dry_run, or --model_config configs/llama_9m.json to scale down).
set -euo pipefail
cd "$(dirname "$0")/../.."
flags=(--tokenizer "${TOKENIZER:-t5-base}" --wandb "${WANDB_MODE:-online}")
[[ -n "${DATA_DIR:-}" ]] && flags+=(--data_dir "$DATA_DIR")
command=(python -m train --model_config configs/llama_7b.json --optimizer apollo_mini --rank 1 --scale_type tensor
    --apollo_scale 128 --proj random --proj_type std --update_proj_gap 200 --lr 0.01
    --batch_size 1 --total_batch_size 1 --max_length 256 --num_training_steps 150000 --warmup_steps 15000
    --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0
    --weight_quant --weight_bits 8 --weight_group_size 128 --stochastic_round --layerwise --single_gpu
    --dtype bfloat16 --state_dtype param --eval_every 1000 --save_every 10000 --seed 42
    --name llama_7b_q_apollo_mini_layerwise "${flags[@]}" "$@")
if [[ -n "${PRINT_COMMAND:-}" ]]; then
    printf '%q ' "${command[@]}"; echo; exit 0
fi
exec "${command[@]}"
