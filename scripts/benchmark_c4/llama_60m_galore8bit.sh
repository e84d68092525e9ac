#!/usr/bin/env bash
# LLaMA-60M: 60m galore_adamw8bit (no published 60M row: GaLore's 60M recipe with 8-bit states). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# 8-bit GaLore (bitsandbytes; pip install -e .[bnb]): GaLore's SVD projection, bitsandbytes' 8-bit Adam on the
# projected gradient (eps 1e-8 on the bias-corrected sqrt(v)); r 128, T 200, galore_scale 0.25, lr 0.01 as the
# GaLore row (PROTOCOL.md); untuned for the 8-bit states: sweep the lr for a fair comparison.
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer galore_adamw8bit --rank 128 --update_proj_gap 200 --galore_scale 0.25 --lr 0.01 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_galore8bit "$@"
