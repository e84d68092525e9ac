#!/usr/bin/env bash
# LLaMA-60M: 60m scale (PEERS.md settings). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 11000 updates, 1100 warmup. Extra flags are forwarded: "$@".
# SCALE (arXiv 2506.16659), its repository's runs: column-normalised SGD (rms), lm_head momentum 0.9, norms
# by AdamW at --adam_lr; 10% warmup, cosine to 0.1, no clipping, wd 0 (PEERS.md).
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer scale --lr 0.001 --adam_lr 0.02 --scale_momentum 0.9 --scale_norm rms \
    --num_training_steps 11000 --warmup_steps 1100 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_scale "$@"
