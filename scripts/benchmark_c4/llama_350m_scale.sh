#!/usr/bin/env bash
# LLaMA-350M: 350m scale (PEERS.md settings). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 60000 updates, 6000 warmup. Extra flags are forwarded: "$@".
# SCALE (arXiv 2506.16659), its repository's runs: column-normalised SGD (rms), lm_head momentum 0.9, norms
# by AdamW at --adam_lr; 10% warmup, cosine to 0.1, no clipping, wd 0 (PEERS.md).
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_350m.json --optimizer scale --lr 0.001 --adam_lr 0.02 --scale_momentum 0.9 --scale_norm rms \
    --num_training_steps 60000 --warmup_steps 6000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_350m_scale "$@"
