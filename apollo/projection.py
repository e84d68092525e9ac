"""Projections of a gradient onto a rank-r subspace: orientation rules, seeded random P, SVD P.

For a weight W in R^{m x n} (PyTorch layout: m = out_features, n = in_features) and its gradient G:

    right projection:  P in R^{r x n},  R = G P^T in R^{m x r},  back(R~) = R~ P      (keeps the m rows)
    left projection:   P in R^{m x r},  R = P^T G in R^{r x n},  back(R~) = P R~      (keeps the n columns)

The *kept dimension* is the one R still has at full length (m for right, n for left); APOLLO's
channel-wise scaling factors live along it.

A random P has i.i.d. N(0, 1/r) entries and is a pure function of (seed, shape, device): the
optimizer stores only the seed and redraws P when it needs it, so every data-parallel rank gets the
same P with no communication.
"""
from __future__ import annotations

import math

import torch

from .spec import Flag

PROJ_TYPES = ("std", "reverse_std", "left", "right")
RIGHT, LEFT = "right", "left"

# The CLI flags of every optimizer that projects onto a rank-r subspace (each spec lists the ones it takes).
RANK = Flag("rank", int, "projection rank r (default: a quarter of the hidden size)", "rank", low=1)
UPDATE_PROJ_GAP = Flag("update_proj_gap", int, "updates between projection refreshes, T (default 200)",
                       "update_proj_gap", low=1)
PROJ_TYPE = Flag("proj_type", str, "which side of each matrix to project (default std: the shorter one)", "proj_type",
                 choices=PROJ_TYPES)

# Seeds advance by drawing this many integers from a generator seeded with the current seed.
_SEED_DRAWS = 15
_SEED_HIGH = 2**63 - 1


def projection_side(shape: torch.Size | tuple[int, int], proj_type: str) -> str:
    """Which side a (m, n) matrix is projected on.

    `std` compresses the smaller dimension (m >= n -> right, else left); `reverse_std` the larger;
    `left` / `right` force a side.
    """
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type in (LEFT, RIGHT):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projection_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of P: (r, n) for a right projection, (m, r) for a left one."""
    m, n = shape
    return (rank, n) if side == RIGHT else (m, rank)


def projected_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of R = project(G): (m, r) for right, (r, n) for left."""
    m, n = shape
    return (m, rank) if side == RIGHT else (rank, n)


def random_projection(
    seed: int,
    shape: tuple[int, int],
    rank: int,
    side: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """P with i.i.d. N(0, 1) / sqrt(r) entries, drawn from a generator on `device` seeded with `seed`.

    One float32 `randn` of P's shape, divided by sqrt(r) in float32, then cast to `dtype`: the same
    bits on every rank and across save/resume for the same (seed, shape, device type).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    proj = torch.randn(projection_shape(shape, rank, side), generator=generator, device=device, dtype=torch.float32)
    proj.div_(math.sqrt(rank))
    return proj if dtype == torch.float32 else proj.to(dtype)


def advance_seed(seed: int) -> int:
    """The seed of the next random P: the last of 15 integers in [0, 2^63 - 1) from a CPU generator seeded with `seed`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return int(torch.randint(0, _SEED_HIGH, (_SEED_DRAWS,), generator=generator)[-1])


def svd_projection(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Orthonormal P from a thin SVD of the gradient, computed in float32 and cast to the gradient's dtype.

    G = U diag(S) V^T: right -> the top-r rows of V^T, shape (r, n); left -> the top-r columns of U, shape (m, r).
    """
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    proj = vh[:rank] if side == RIGHT else u[:, :rank]
    return proj.contiguous().to(grad.dtype)


def project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """R = G P^T (right, (m, r)) or P^T G (left, (r, n))."""
    return grad @ proj.T if side == RIGHT else proj.T @ grad


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """The full-rank image of a low-rank update: R~ P (right) or P R~ (left), shape (m, n)."""
    return low_rank @ proj if side == RIGHT else proj @ low_rank


def channel_dim(side: str) -> int:
    """Axis of R that has length r; norms over it give one number per kept channel."""
    return 1 if side == RIGHT else 0
