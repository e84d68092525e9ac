#!/usr/bin/env bash
# LLaMA-350M: 350m muon (PEERS.md settings). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 60000 updates, 6000 warmup. Extra flags are forwarded: "$@".
# torch.optim.Muon on attention/MLP matrices + AdamW on embeddings, lm_head, norms. The lrs are PEERS.md's
# starting points from another setup (seq 4096; Muon 0.016-0.004, AdamW part 0.0032-0.0012 from small to
# large): SWEEP --lr and --adam_lr before comparing (python -m train.sweep ... --lr ...).
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_350m.json --optimizer muon --lr 0.008 --adam_lr 0.0016 --muon_momentum 0.95 \
    --num_training_steps 60000 --warmup_steps 6000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0.1 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_350m_muon "$@"
