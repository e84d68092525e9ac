#!/usr/bin/env bash
# LLaMA-350M: 350m Q-APOLLO (PROTOCOL.md recipe table): APOLLO with int8 attention/MLP weights (groups of 128,
# stochastic rounding). Published setup: 4 GPU(s), micro-batch 128, total batch 512, 60000 updates, 6000 warmup.
# Extra flags are forwarded: "$@".
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_350m.json --optimizer apollo --rank 256 --scale_type channel --apollo_scale 1 --proj random --proj_type std --update_proj_gap 200 --lr 0.01 \
    --weight_quant --weight_bits 8 --weight_group_size 128 --stochastic_round \
    --num_training_steps 60000 --warmup_steps 6000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_350m_q_apollo "$@"
