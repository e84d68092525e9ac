#!/usr/bin/env bash
# LLaMA-130M: 130m adamw (PROTOCOL.md recipe table). Published setup: 4 GPU(s),
# micro-batch 128, total batch 512, 20000 updates, 2000 warmup. Extra flags are forwarded: "$@".
# AdamW's lr: 0.005, the best of PROTOCOL.md's long-context sweep (1e-3 .. 1e-2); sweep it for a fair baseline.
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_130m.json --optimizer adamw --lr 0.005 \
    --num_training_steps 20000 --warmup_steps 2000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_130m_adamw "$@"
