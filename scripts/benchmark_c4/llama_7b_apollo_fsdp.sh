#!/usr/bin/env bash
# LLaMA-7B: 7b apollo with FSDP2 (the PROTOCOL.md 7B APOLLO recipe, sharded instead of DDP): 8 GPU(s),
# micro-batch 16, total batch 512, 150000 updates, 15000 warmup. Weights, gradients and optimizer state
# are split over the GPUs (float32 shards, bfloat16 compute, float32 gradient reduction); checkpoints
# are torch.distributed.checkpoint folders, resumable with the same GPU count. Extra flags: "$@".
DEFAULT_NGPU=8
source "$(dirname "$0")/common.sh"
launch 16 --model_config configs/llama_7b.json --optimizer apollo --rank 256 --scale_type channel --apollo_scale 1 --proj random --proj_type std --update_proj_gap 200 --lr 0.01 \
    --num_training_steps 150000 --warmup_steps 15000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype float32 --fsdp --fsdp_mixed_precision --seed 42 --name llama_7b_apollo_fsdp "$@"
