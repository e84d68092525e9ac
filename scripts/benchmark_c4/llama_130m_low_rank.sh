#!/usr/bin/env bash
# LLaMA-130M: 130m low_rank (PEERS.md "Table-2 baselines": GaLore's protocol, App. C.1). Setup: 4 GPU(s),
# micro-batch 128, total batch 512, 20000 updates, 2000 warmup. Extra flags are forwarded: "$@".
# Low-Rank (GaLore Table 2's row): every attention/MLP weight replaced by (alpha/r) B A, no W0;
# A and B at nn.Linear's default U(+-1/sqrt fan_in) (ReLoRA's lora_only path; --lora_init zero_b for B = 0).
# r 256 (GaLore's r at this size), alpha 32 (s = 0.125), dropout 0.05; AdamW beta (0.9, 0.999), eps 1e-8, wd 0, no clipping.
# lr: unpublished (GaLore issue #68); 1e-3 is a start: sweep {1e-2, 5e-3, 1e-3, 5e-4, 1e-4} by final validation
# perplexity, as GaLore did (e.g. a train.study row: optimizer = "adamw", adapter = "low_rank", lora_rank = 256).
DEFAULT_NGPU=4
source "$(dirname "$0")/common.sh"
launch 128 --model_config configs/llama_130m.json --optimizer adamw --adapter low_rank --lora_rank 256 --lora_alpha 32 \
    --lora_dropout 0.05 --lr 0.001 --beta1 0.9 --beta2 0.999 --eps 1e-8 --weight_decay 0 --grad_clipping 0 \
    --num_training_steps 20000 --warmup_steps 2000 --scheduler cosine --min_lr_ratio 0.1 \
    --eval_every 1000 --save_every 10000 --dtype bfloat16 --seed 42 --name llama_130m_low_rank "$@"
