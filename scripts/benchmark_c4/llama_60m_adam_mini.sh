#!/usr/bin/env bash
# LLaMA-60M: 60m adam_mini (PEERS.md settings). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# Adam-mini (arXiv 2406.16793): AdamW's settings with one second moment per block. lr 0.005 is this
# harness's AdamW baseline lr (PROTOCOL.md sweep); the published runs use another setup: SWEEP --lr.
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer adam_mini --lr 0.005 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_adam_mini "$@"
