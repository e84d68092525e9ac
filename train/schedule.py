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

`cosine_restarts` (ReLoRA's jagged cosine, PEERS.md "### ReLoRA"): with N = num_training_steps, W1 =
warmup_steps, Wr = restart_warmup_steps, C = cycle_length, rho = min_lr_ratio and
q(x) = rho + (1 - rho) (1 + cos(pi x)) / 2, the multiplier of update t is t / W1 for t < W1, else, with
s = t + adjust_step, k = s mod C and n = floor(s / C), the cosine q((s - W1) / (N - W1)) except on the
ramps after each restart:
    variant "galore" (GaLore's copy, relora before ac33a08; the default): k < Wr ->
        (k / Wr) q(n C / (N - W1)), a ramp towards the cosine's value at the cycle's start;
    variant "relora_head" (Guitaricet/relora HEAD): k < Wr and t >= C ->
        (k / Wr) q((n C + Wr - W1) / (N - W1)), a ramp towards the value where the ramp ends.
Update kC (multiplier 0) opens each ramp, so the factors ReLoRA re-initialises after update kC + 1 start
on it. Both need C to divide N and W1 + adjust_step < C (<= C for relora_head), checked by
`check_restarts` with one-line errors. In GaLore's copy a first cycle with W1 < Wr also runs the ramp
formula for W1 <= k < Wr (n = 0: (k / Wr) q(0)); that is the published formula, kept.
"""
from __future__ import annotations

import math

SCHEDULERS = ("cosine", "linear", "constant", "wsd", "cosine_restarts")
RESTART_VARIANTS = ("galore", "relora_head")


def decay_steps(num_training_steps: int, decay_fraction: float) -> int:
    """Updates in the decay of `wsd`: decay_fraction x num_training_steps rounded to the nearest integer
    (ties to even, Python's round), at least 1."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
    return max(1, round(decay_fraction * num_training_steps))


def lr_multiplier(
    step: int, *, num_training_steps: int, warmup_steps: int, scheduler: str = "cosine", min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2, cycle_length: int | None = None, restart_warmup_steps: int = 0, adjust_step: int = 0,
    restart_variant: str = "galore",
) -> float:
    """Multiplier of the peak lr for update `step` (0-based); `step == num_training_steps` gives the end value.

    `decay_fraction` is used by `wsd` only; `cycle_length`, `restart_warmup_steps`, `adjust_step` and
    `restart_variant` by `cosine_restarts` only (`jagged_cosine`).
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
    if scheduler == "cosine_restarts":
        return jagged_cosine(step, num_training_steps=num_training_steps, warmup_steps=warmup_steps,
                             cycle_length=cycle_length, restart_warmup_steps=restart_warmup_steps,
                             adjust_step=adjust_step, min_lr_ratio=min_lr_ratio, variant=restart_variant)
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


def check_restarts(*, num_training_steps: int, warmup_steps: int, cycle_length: int | None, restart_warmup_steps: int,
                   adjust_step: int = 0, variant: str = "galore") -> None:
    """ValueError (one line naming the flags) unless the jagged cosine's settings are consistent."""
    if variant not in RESTART_VARIANTS:
        raise ValueError(f"restart variant must be one of {', '.join(RESTART_VARIANTS)}, got {variant!r}")
    if cycle_length is None or cycle_length < 1:
        raise ValueError(f"--scheduler cosine_restarts needs --cycle_length, a positive integer, got {cycle_length}")
    if num_training_steps % cycle_length:
        raise ValueError(f"--num_training_steps {num_training_steps} must be divisible by --cycle_length {cycle_length}")
    if not 0 <= restart_warmup_steps <= cycle_length:
        raise ValueError(f"--restart_warmup_steps must be in [0, --cycle_length {cycle_length}], got {restart_warmup_steps}")
    if adjust_step < 0:
        raise ValueError(f"--adjust_step must be >= 0, got {adjust_step}")
    first = warmup_steps + adjust_step
    if first > cycle_length or (first == cycle_length and variant == "galore"):
        relation = "<=" if variant == "relora_head" else "<"
        raise ValueError(f"--warmup_steps {warmup_steps} + --adjust_step {adjust_step} must be {relation} --cycle_length "
                         f"{cycle_length}: the first restart would come before the first warmup ends")
    if first >= num_training_steps:
        raise ValueError(f"--warmup_steps {warmup_steps} + --adjust_step {adjust_step} must be smaller than "
                         f"--num_training_steps {num_training_steps}")


def jagged_cosine(step: int, *, num_training_steps: int, warmup_steps: int, cycle_length: int | None,
                  restart_warmup_steps: int, adjust_step: int = 0, min_lr_ratio: float = 0.1,
                  variant: str = "galore") -> float:
    """ReLoRA's jagged cosine multiplier of update `step` (the module docstring's formula, both variants)."""
    check_restarts(num_training_steps=num_training_steps, warmup_steps=warmup_steps, cycle_length=cycle_length,
                   restart_warmup_steps=restart_warmup_steps, adjust_step=adjust_step, variant=variant)
    n_steps, w1, cycle, wr = num_training_steps, warmup_steps, cycle_length, restart_warmup_steps

    def q(x: float) -> float:
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))

    if step < w1:
        return step / w1
    s = step + adjust_step
    k, n = s % cycle, s // cycle
    if k < wr:
        if variant == "galore":
            return k / wr * q(n * cycle / (n_steps - w1))
        if step >= cycle:
            return k / wr * q((n * cycle + wr - w1) / (n_steps - w1))
    return q((s - w1) / (n_steps - w1))
