"""The update math as pure functions: one parameter, its gradient and its state tensors in, updated in place.

Notation (ALGORITHMS.md): G_t gradient at step t (t counts from 1), eta_t the lr, beta1, beta2, eps,
weight decay lambda. Every update uses the bias-corrected step size with epsilon on the
*uncorrected* sqrt(V):

    k_t = eta_t * sqrt(1 - beta2^t) / (1 - beta1^t)

and decoupled weight decay applied *after* the update with the plain lr: W <- W - eta_t * lambda * W.
The optimizer classes in `optimizer.py` do the bookkeeping (state, seeds, refreshes) and call these.
"""
from __future__ import annotations

import math

import torch

from .projection import channel_dim, project, project_back

# Keeps the scaling ratio and the limiter finite when a norm is exactly zero.
NORM_EPS = 1e-8


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """k_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def decay_weights(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W <- W - lr * lambda * W, after the update (decoupled, plain lr)."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)


def adam_direction(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """Update the moments in place and return the normalised direction M / (sqrt(V) + eps).

    M_t = beta1 M_{t-1} + (1 - beta1) g_t;  V_t = beta2 V_{t-1} + (1 - beta2) g_t^2.
    `grad` is cast to the moments' dtype (the state dtype may be wider than the parameter's).
    Peak scratch: one moment-sized tensor (the cast copy of `grad` is freed before sqrt(V) is
    allocated, and the division writes into sqrt(V)'s memory): what train.memory counts.
    """
    grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    del grad
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom)


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The AdamW of the spec for regular parameters: W <- W - k_t M_t / (sqrt(V_t) + eps), then decay."""
    direction = adam_direction(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps)
    param.add_(direction.to(param.dtype), alpha=-bias_corrected_step_size(lr, beta1, beta2, step))
    decay_weights(param, lr, weight_decay)


def scaling_factor(projected: torch.Tensor, normalized: torch.Tensor, *, scale_type: str, side: str) -> torch.Tensor:
    """APOLLO's gradient scaling factor from the low-rank space.

    channel: s_j = ||R~[j]||_2 / (||R[j]||_2 + 1e-8), one per index j of the kept dimension (norms over the
             length-r axis), shaped to broadcast against G: (m, 1) for right projection, (1, n) for left.
    tensor:  s = ||R~||_F / (||R||_F + 1e-8), a 0-d tensor.
    R is the projected gradient, R~ the normalised low-rank Adam direction.
    """
    projected = projected.to(normalized.dtype)
    if scale_type == "tensor":
        return normalized.norm() / (projected.norm() + NORM_EPS)
    dim = channel_dim(side)
    return normalized.norm(dim=dim, keepdim=True) / (projected.norm(dim=dim, keepdim=True) + NORM_EPS)


def limit_norm_growth(
    update: torch.Tensor, previous_norm: torch.Tensor | None, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: the update's norm grows at most a factor gamma per step.

    q = ||S||_F. First call (no previous norm): S unchanged, remember q. Later:
    l = max(q / (p + 1e-8), gamma) / gamma;  S <- S / l;  p <- q / l.
    Returns (S, new p); stays on the device (no host sync). Norms are kept in at least float32.
    """
    norm = torch.linalg.vector_norm(update, dtype=torch.promote_types(update.dtype, torch.float32))
    limit = growth_limit(norm, previous_norm, gamma)
    if limit is None:
        return update, norm
    return update / limit.to(update.dtype), norm / limit


def growth_limit(norm: torch.Tensor, previous_norm: torch.Tensor | None, gamma: float) -> torch.Tensor | None:
    """The limiter's divisor for an update of norm q after one of p: l = max(q / (p + 1e-8), gamma) / gamma;
    None on the first step (no previous norm: nothing to limit).

    A previous norm of exactly 0 also means "no limit yet" (l = 1): a step whose gradient was all zeros
    (torchtitan's lr-0 state initialisation, a frozen-then-unfrozen layer) would otherwise cap the next
    update at 1.01 x 1e-8 and need ~1,800 steps to regrow. The published code limits it; for p > 0 the
    result is bit-identical to it. Stays on the device (no host sync)."""
    if previous_norm is None:
        return None
    limit = torch.clamp(norm / (previous_norm + NORM_EPS), min=gamma) / gamma
    return torch.where(previous_norm > 0, limit, torch.ones_like(limit))


def apollo_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    limiter_norm: torch.Tensor | None,
    *,
    side: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale_type: str,
    scale: float,
    scale_front: bool,
    limiter_gamma: float | None,
) -> torch.Tensor | None:
    """One APOLLO / APOLLO-Mini step for a low-rank weight; returns the limiter's new norm (None when off).

    R = project(G);  R~ = Adam(R);  S = G * s(R, R~);  S <- sqrt(c) S;  S <- limiter(S);
    W <- W - k_t S;  then decay. `scale_front` applies sqrt(c) before the limiter instead of after
    (equal up to the 1e-8 term, since the limiter is scale invariant).
    """
    projected = project(grad, proj, side)
    normalized = adam_direction(projected, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps)
    factor = scaling_factor(projected, normalized, scale_type=scale_type, side=side)
    update = grad * factor.to(grad.dtype)
    sqrt_scale = math.sqrt(scale)
    if scale_front:
        update.mul_(sqrt_scale)
    new_norm = None
    if limiter_gamma is not None:
        update, new_norm = limit_norm_growth(update, limiter_norm, limiter_gamma)
    if not scale_front:
        update.mul_(sqrt_scale)
    param.add_(update, alpha=-bias_corrected_step_size(lr, beta1, beta2, step))
    decay_weights(param, lr, weight_decay)
    return new_norm


def galore_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    side: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """One GaLore-AdamW step: Adam in the subspace, update projected back to full rank.

    R = project(G);  R~ = Adam(R);  W <- W - k_t * scale * back(R~);  then decay.
    The update lies in the r-dimensional subspace spanned by P.
    """
    projected = project(grad, proj, side)
    normalized = adam_direction(projected, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps)
    update = project_back(normalized.to(param.dtype), proj, side)
    param.add_(update, alpha=-bias_corrected_step_size(lr, beta1, beta2, step) * scale)
    decay_weights(param, lr, weight_decay)
