"""The learning-rate schedule as a pure function: update index -> multiplier of the peak lr.

Update k (0-based, k = 0 .. num_training_steps - 1) runs at lr = peak x lr_multiplier(k). Warmup rises
linearly from 0 (k / warmup_steps, so the first update has lr 0, as in the published code), then
`cosine` decays as min_lr_ratio + (1 - min_lr_ratio) x (1 + cos(pi x progress)) / 2 with
progress = (k - warmup_steps) / (num_training_steps - warmup_steps), `linear` as
min_lr_ratio + (1 - min_lr_ratio) x (1 - progress), and `constant` stays at 1. Exactly
num_training_steps updates run; the published code ran one more, at lr close to 0.
"""
from __future__ import annotations

import math

SCHEDULERS = ("cosine", "linear", "constant")


def lr_multiplier(
    step: int, *, num_training_steps: int, warmup_steps: int, scheduler: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    """Multiplier of the peak lr for update `step` (0-based); `step == num_training_steps` gives the end value."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if not 0 <= warmup_steps < num_training_steps:
        raise ValueError(f"need 0 <= warmup_steps < num_training_steps, got {warmup_steps} and {num_training_steps}")
    if not 0 <= step <= num_training_steps:
        raise ValueError(f"step must be in [0, {num_training_steps}], got {step}")
    if step < warmup_steps:
        return step / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / (num_training_steps - warmup_steps)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
