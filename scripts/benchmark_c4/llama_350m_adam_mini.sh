#!/usr/bin/env bash
# LLaMA-350M: 350m adam_mini (PEERS.md settings). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 60000 updates, 6000 warmup. Extra flags are forwarded: "$@".
# Adam-mini (arXiv 2406.16793): AdamW's settings with one second moment per block. lr 0.005 is this
# harness's AdamW baseline lr (PROTOCOL.md sweep); the published runs use another setup: SWEEP --lr.
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_350m.json --optimizer adam_mini --lr 0.005 \
    --num_training_steps 60000 --warmup_steps 6000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_350m_adam_mini "$@"
