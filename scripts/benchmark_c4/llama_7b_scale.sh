#!/usr/bin/env bash
# LLaMA-7B: 7b scale (PEERS.md settings). Setup: 8 GPU(s),
# micro-batch 16, total batch 512, 150000 updates, 15000 warmup. Extra flags are forwarded: "$@".
# SCALE (arXiv 2506.16659), its repository's runs: column-normalised SGD (rms), lm_head momentum 0.9, norms
# by AdamW at --adam_lr; 10% warmup, cosine to 0.1, no clipping, wd 0 (PEERS.md).
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 16 --model_config configs/llama_7b.json --optimizer scale --lr 0.0001 --adam_lr 0.001 --scale_momentum 0.9 --scale_norm rms \
    --num_training_steps 150000 --warmup_steps 15000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_7b_scale "$@"
