#!/usr/bin/env bash
# LLaMA-130M: 130m flora (PEERS.md's suggested settings: none published). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 20000 updates, 2000 warmup. Extra flags are forwarded: "$@".
# Flora (arXiv 2402.03293): Adafactor, momentum in a seeded random rank-r subspace re-drawn every kappa = 1000
# updates; r = GaLore's, beta1 0.9, relative steps (lr x rms(W)). lr 0.01 = Adafactor's relative-step
# ceiling; untuned: PEERS.md says sweep it.
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_130m.json --optimizer flora --rank 256 --update_proj_gap 1000 --beta1 0.9 --lr 0.01 \
    --num_training_steps 20000 --warmup_steps 2000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_130m_flora "$@"
