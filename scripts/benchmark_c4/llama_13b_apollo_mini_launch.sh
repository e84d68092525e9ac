#!/usr/bin/env bash
# LLaMA-13B: 13b apollo mini launch (PROTOCOL.md recipe table). Published setup: 4 GPU(s),
# micro-batch 1, total batch 512, 50 updates, 0 warmup. Extra flags are forwarded: "$@".
# Launch test only (50 updates, no warmup): shows that 13B trains with plain DDP on 80 GB cards.
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 1 --model_config configs/llama_13b.json --optimizer apollo_mini --rank 1 --scale_type tensor --apollo_scale 128 --proj random --proj_type std --update_proj_gap 200 --lr 0.01 \
    --num_training_steps 50 --warmup_steps 0 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 50 --save_every 50 --dtype bfloat16 --seed 42 --name llama_13b_apollo_mini_launch "$@"
