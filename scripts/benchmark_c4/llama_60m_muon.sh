#!/usr/bin/env bash
# LLaMA-60M: 60m muon (PEERS.md settings). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# torch.optim.Muon on attention/MLP matrices + AdamW on embeddings, lm_head, norms. The lrs are PEERS.md's
# starting points from another setup (seq 4096; Muon 0.016-0.004, AdamW part 0.0032-0.0012 from small to
# large): SWEEP --lr and --adam_lr before comparing (python -m train.sweep ... --lr ...).
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer muon --lr 0.016 --adam_lr 0.0032 --muon_momentum 0.95 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0.1 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_muon "$@"
