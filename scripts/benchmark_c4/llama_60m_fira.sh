#!/usr/bin/env bash
# LLaMA-60M: 60m fira (PEERS.md settings). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# Fira (arXiv 2410.01623): GaLore's SVD subspace + the norm-scaled residual, limiter 1.01; lr 0.01, T 200,
# alpha 0.25 below 1B, 0.0625 at 1B; the published code's residual (PEERS.md).
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer fira --rank 128 --update_proj_gap 200 --fira_alpha 0.25 --lr 0.01 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_fira "$@"
