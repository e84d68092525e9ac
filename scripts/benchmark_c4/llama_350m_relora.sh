#!/usr/bin/env bash
# LLaMA-350M: 350m relora (GaLore Table 2's ReLoRA row; PEERS.md "### ReLoRA"). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 60000 updates, 6000 warmup. Extra flags are forwarded: "$@".
# ReLoRA = LoRA (r 256, alpha 32, dropout 0.05, W0 frozen at its random init: no full-rank warm start, as GaLore
# ran it) + merge/re-init every T_m = 12000 updates + random pruning of 99.9% of the factors' Adam moments after
# updates kC + 1 + the jagged cosine (C = 12000, ramps of Wr = 100). T_m, C, Wr: unpublished; C = N/5 is the
# smallest of PEERS.md's suggested {N/10, N/5, N/2} that leaves room for the 10% first warmup (W1 < C).
# AdamW beta (0.9, 0.999), eps 1e-8, wd 0, no clipping. lr 1e-3 (ReLoRA's README: 2x full-rank) is untuned:
# GaLore picked each row's lr from {1e-2, 5e-3, 1e-3, 5e-4, 1e-4} by final validation perplexity; sweep it.
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_350m.json --optimizer adamw --lr 0.001 --beta1 0.9 --beta2 0.999 --eps 1e-8 \
    --adapter lora --lora_rank 256 --lora_alpha 32 --lora_dropout 0.05 \
    --relora 12000 --cycle_length 12000 --restart_warmup_steps 100 --reset_optimizer_on_relora \
    --num_training_steps 60000 --warmup_steps 6000 --scheduler cosine_restarts --min_lr_ratio 0.1 --weight_decay 0 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_350m_relora "$@"
