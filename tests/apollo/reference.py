"""An independent float64 re-derivation of ALGORITHMS.md, written without the apollo package.

Used by the tests as ground truth: every step is spelled out per matrix with plain tensor algebra.
Random P follows the spec's seed rules (1-based position, 15 draws to advance); SVD P comes from the
same float32 LAPACK call the spec prescribes, so both sides see identical projections.
"""
from __future__ import annotations

import math

import torch


def draw_random_p(seed: int, shape: tuple[int, int], rank: int, side: str) -> torch.Tensor:
    """N(0, 1/r) entries: one float32 randn from a CPU generator seeded with `seed`, then / sqrt(r)."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    p_shape = (rank, n) if side == "right" else (m, rank)
    return (torch.randn(p_shape, generator=g, dtype=torch.float32) / math.sqrt(rank)).double()


def next_seed(seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2**63 - 1, (15,), generator=g)[-1])


def svd_p(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (vh[:rank] if side == "right" else u[:, :rank]).double()


def side_of(shape, proj_type: str) -> str:
    m, n = shape
    tall = m >= n
    return {
        "std": "right" if tall else "left",
        "reverse_std": "left" if tall else "right",
        "left": "left",
        "right": "right",
    }[proj_type]


class ReferenceLowRank:
    """Float64 APOLLO (method="apollo") or GaLore (method="galore") for one matrix."""

    def __init__(self, weight, *, method, seed, rank, proj, proj_type, scale_type="channel", scale=1.0,
                 gap=200, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, limiter=True, gamma=1.01,
                 scale_front=False):
        self.w = weight.double().clone()
        self.method, self.seed, self.rank, self.proj = method, seed, rank, proj
        self.side = side_of(tuple(weight.shape), proj_type)
        self.scale_type, self.scale, self.gap, self.lr = scale_type, scale, gap, lr
        self.b1, self.b2 = betas
        self.eps, self.wd, self.limiter, self.gamma, self.scale_front = eps, weight_decay, limiter, gamma, scale_front
        self.t = 0
        self.p = None
        self.m = self.v = None
        self.prev_norm = None
        self.first_draw = True

    def step(self, grad):
        g = grad.double()
        if self.t % self.gap == 0:
            if self.proj == "svd":
                self.p = svd_p(grad, self.rank, self.side)
            else:
                if not self.first_draw:
                    self.seed = next_seed(self.seed)
                self.first_draw = False
                self.p = draw_random_p(self.seed, tuple(g.shape), self.rank, self.side)
        self.t += 1
        r = g @ self.p.T if self.side == "right" else self.p.T @ g
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        r_tilde = self.m / (torch.sqrt(self.v) + self.eps)
        k = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        if self.method == "galore":
            back = r_tilde @ self.p if self.side == "right" else self.p @ r_tilde
            update = self.scale * back
        else:
            if self.scale_type == "tensor":
                s = torch.linalg.norm(r_tilde) / (torch.linalg.norm(r) + 1e-8)
            else:
                axis = 1 if self.side == "right" else 0  # the length-r axis
                s = torch.linalg.norm(r_tilde, dim=axis, keepdim=True) / (torch.linalg.norm(r, dim=axis, keepdim=True) + 1e-8)
            update = g * s
            if self.scale_front:
                update = update * math.sqrt(self.scale)
            if self.limiter:
                q = torch.linalg.norm(update)
                if self.prev_norm is None:
                    self.prev_norm = q
                else:
                    ell = max(q / (self.prev_norm + 1e-8), self.gamma) / self.gamma
                    update = update / ell
                    self.prev_norm = q / ell
            if not self.scale_front:
                update = update * math.sqrt(self.scale)
        self.w = self.w - k * update
        self.w = self.w - self.lr * self.wd * self.w
        return self.w


class ReferenceAdamW:
    """Float64 AdamW of the spec: eps on the uncorrected sqrt(v), bias correction in the step size, decay after."""

    def __init__(self, weight, *, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        self.w = weight.double().clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.t = 0

    def step(self, grad):
        g = grad.double()
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        k = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.w = self.w - k * self.m / (torch.sqrt(self.v) + self.eps)
        self.w = self.w - self.lr * self.wd * self.w
        return self.w
