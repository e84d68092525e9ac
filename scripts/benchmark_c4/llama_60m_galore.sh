#!/usr/bin/env bash
# LLaMA-60M: 60m galore (PROTOCOL.md recipe table). Published setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# GaLore baseline: rank as APOLLO, T = 200, galore_scale 0.25, lr 0.01 (PROTOCOL.md).
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer galore --rank 128 --update_proj_gap 200 --galore_scale 0.25 --lr 0.01 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_galore "$@"
