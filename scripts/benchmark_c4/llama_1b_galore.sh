#!/usr/bin/env bash
# LLaMA-1B: 1b galore (PROTOCOL.md recipe table). Published setup: 8 GPU(s),
# micro-batch 64, total batch 512, 100000 updates, 10000 warmup. Extra flags are forwarded: "$@".
# GaLore baseline: rank as APOLLO, T = 200, galore_scale 0.25, lr 0.01 (PROTOCOL.md).
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 64 --model_config configs/llama_1b.json --optimizer galore --rank 256 --update_proj_gap 200 --galore_scale 0.25 --lr 0.01 \
    --num_training_steps 100000 --warmup_steps 10000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_1b_galore "$@"
