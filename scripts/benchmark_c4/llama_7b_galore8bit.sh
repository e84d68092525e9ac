#!/usr/bin/env bash
# LLaMA-7B: 7b galore_adamw8bit (APOLLO's Table 3 / GaLore §5.3, PEERS.md). Setup: 8 GPU(s),
# micro-batch 16, total batch 512, 150000 updates, 15000 warmup. Extra flags are forwarded: "$@".
# 8-bit GaLore (bitsandbytes; pip install -e .[bnb]) with the published 7B settings: r 1024, T 500, galore_scale
# 0.25, lr 0.005 (one untuned trial), warmup 15K of 150K, gradient clipping 1.0, bf16 (published: 64 A100s,
# batch 512 x 256; 14.65 perplexity at 150K steps, reported).
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 16 --model_config configs/llama_7b.json --optimizer galore_adamw8bit --rank 1024 --update_proj_gap 500 --galore_scale 0.25 --lr 0.005 \
    --num_training_steps 150000 --warmup_steps 15000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 --grad_clipping 1.0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_7b_galore8bit "$@"
