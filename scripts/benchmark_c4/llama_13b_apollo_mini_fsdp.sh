#!/usr/bin/env bash
# LLaMA-13B: 13b apollo mini launch with FSDP2 (the PROTOCOL.md 13B launch test, sharded instead of DDP):
# 4 GPU(s), micro-batch 1, total batch 512, 50 updates, no warmup. Float32 shards, bfloat16 compute,
# float32 gradient reduction. Extra flags are forwarded: "$@".
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 1 --model_config configs/llama_13b.json --optimizer apollo_mini --rank 1 --scale_type tensor --apollo_scale 128 --proj random --proj_type std --update_proj_gap 200 --lr 0.01 \
    --num_training_steps 50 --warmup_steps 0 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 50 --save_every 50 --dtype float32 --fsdp --fsdp_mixed_precision --seed 42 --name llama_13b_apollo_mini_fsdp "$@"
