"""The learning-rate schedule as a pure function: update index -> multiplier of the peak lr.

Update k (0-based, k = 0 .. num_training_steps - 1) runs at lr = peak x lr_multiplier(k). Warmup rises
linearly from 0 (k / warmup_steps, so the first update has lr 0, as in the published code), then
`cosine` decays as min_lr_ratio + (1 - min_lr_ratio) x (1 + cos(pi x progress)) / 2 with
progress = (k - warmup_steps) / (num_training_steps - warmup_steps), `linear` as
min_lr_ratio + (1 - min_lr_ratio) x (1 - progress), and `constant` stays at 1. Exactly
num_training_steps updates run; the published code ran one more, at lr close to 0.

`wsd` (warmup-stable-decay): the same warmup, then the peak lr, then a linear decay to min_lr_ratio over
the last D = decay_steps(N, decay_fraction) = max(1, round(decay_fraction x N)) of the N updates:
with s = N - D, multiplier 1 for warmup_steps <= k < s and min_lr_ratio + (1 - min_lr_ratio) x
(1 - (k - s) / D) for k >= s (so update s is still at the peak, and k = N gives min_lr_ratio). The
decay may not start before warmup ends (s >= warmup_steps). Linear is the decay shape of WSD's usual
form, and the baseline "cooldown" of Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations" (arXiv 2405.18392), who found a (1 - sqrt) shape slightly better;
that shape is not implemented here.
"""
from __future__ import annotations

import math

SCHEDULERS = ("cosine", "linear", "constant", "wsd")


def decay_steps(num_training_steps: int, decay_fraction: float) -> int:
    """Updates in the decay of `wsd`: decay_fraction x num_training_steps rounded to the nearest integer
    (ties to even, Python's round), at least 1."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    return max(1, round(decay_fraction * num_training_steps))


def lr_multiplier(
    step: int, *, num_training_steps: int, warmup_steps: int, scheduler: str = "cosine", min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the peak lr for update `step` (0-based); `step == num_training_steps` gives the end value.

    `decay_fraction` is used by `wsd` only.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if not 0 <= warmup_steps < num_training_steps:
        raise ValueError(f"need 0 <= warmup_steps < num_training_steps, got {warmup_steps} and {num_training_steps}")
    if not 0 <= step <= num_training_steps:
        raise ValueError(f"step must be in [0, {num_training_steps}], got {step}")
    if scheduler == "wsd":
        decay = decay_steps(num_training_steps, decay_fraction)
        decay_start = num_training_steps - decay
        if decay_start < warmup_steps:
            raise ValueError(f"wsd: the decay of {decay} updates would start at update {decay_start}, "
                             f"before the {warmup_steps} warmup updates end")
    if step < warmup_steps:
        return step / warmup_steps
    if scheduler == "constant":
        return 1.0
    if scheduler == "wsd":
        if step < decay_start:
            return 1.0
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - (step - decay_start) / decay)
    progress = (step - warmup_steps) / (num_training_steps - warmup_steps)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
