#!/usr/bin/env bash
# LLaMA-7B: 7b adamw8bit (PEERS.md settings). Setup: 8 GPU(s),
# micro-batch 4, total batch 512, 150000 updates, 15000 warmup. Extra flags are forwarded: "$@".
# 8-bit AdamW (bitsandbytes; pip install -e .[bnb]) in the GaLore setup of APOLLO's Table 3 (8-bit Adam 14.61
# at 150K steps, reported). lr as this harness's AdamW baseline; sweep it for a fair baseline.
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 4 --model_config configs/llama_7b.json --optimizer adamw8bit --lr 0.005 \
    --num_training_steps 150000 --warmup_steps 15000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_7b_adamw8bit "$@"
