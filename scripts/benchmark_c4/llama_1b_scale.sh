#!/usr/bin/env bash
# LLaMA-1B: 1b scale (PEERS.md settings). Setup: 8 GPU(s),
# micro-batch 64, total batch 512, 100000 updates, 10000 warmup. Extra flags are forwarded: "$@".
# SCALE (arXiv 2506.16659), its repository's runs: column-normalised SGD (rms), lm_head momentum 0.9, norms
# by AdamW at --adam_lr; 10% warmup, cosine to 0.1, no clipping, wd 0 (PEERS.md).
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 64 --model_config configs/llama_1b.json --optimizer scale --lr 0.0002 --adam_lr 0.001 --scale_momentum 0.9 --scale_norm rms \
    --num_training_steps 100000 --warmup_steps 10000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_1b_scale "$@"
