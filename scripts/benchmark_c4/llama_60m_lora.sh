#!/usr/bin/env bash
# LLaMA-60M: 60m lora (PEERS.md "Table-2 baselines": GaLore's protocol, App. C.1). Setup: 1 GPU(s),
# micro-batch 256, total batch 512, 10000 updates, 1000 warmup. Extra flags are forwarded: "$@".
# LoRA (GaLore Table 2's row): W0 frozen at its random init, y = W0 x + (alpha/r) B A drop(x) on every
# attention/MLP linear (peft), A kaiming-uniform, B = 0; embeddings, lm_head and norms trained.
# r 128 (GaLore's r at this size), alpha 32 (s = 0.25), dropout 0.05; AdamW beta (0.9, 0.999), eps 1e-8, wd 0, no clipping.
# lr: unpublished (GaLore issue #68); 1e-3 is a start: sweep {1e-2, 5e-3, 1e-3, 5e-4, 1e-4} by final validation
# perplexity, as GaLore did (e.g. a train.study row: optimizer = "adamw", adapter = "lora", lora_rank = 128).
DEFAULT_NGPU=1
source "$(dirname "$0")/common.sh"
launch 256 --model_config configs/llama_60m.json --optimizer adamw --adapter lora --lora_rank 128 --lora_alpha 32 \
    --lora_dropout 0.05 --lr 0.001 --beta1 0.9 --beta2 0.999 --eps 1e-8 --weight_decay 0 --grad_clipping 0 \
    --num_training_steps 10000 --warmup_steps 1000 --scheduler cosine --min_lr_ratio 0.1 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_60m_lora "$@"
