r"""The fast step: the update math of `functional.py` over lists of tensors, fused where torch allows.

`functional.py` is the readable definition (one tensor at a time); the functions here compute the same
update, equal up to float round-off (tests/apollo/test_fused.py states the tolerances), with fewer
passes over the full-size tensors:

- regular parameters go through torch's fused AdamW kernel (one pass over W, G, M, V). The spec puts
  epsilon on the *uncorrected* :math:`\sqrt{V}` and decays after the update; torch puts epsilon on
  :math:`\sqrt{V/(1-\beta_2^t)}` and decays before. With

  .. math:: \epsilon' = \epsilon / \sqrt{1-\beta_2^t},\quad \eta' = \eta(1-\eta\lambda),\quad
            \lambda' = \lambda / (1-\eta\lambda)

  torch's :math:`W(1-\eta'\lambda') - \tfrac{\eta'}{1-\beta_1^t} M / (\sqrt{V}/\sqrt{1-\beta_2^t} + \epsilon')`
  equals the spec's :math:`(W - k_t M/(\sqrt V + \epsilon))(1-\eta\lambda)` exactly in real arithmetic.
- APOLLO never materialises the scaled gradient :math:`S = \sqrt{c}\, s \odot G`: the limiter needs
  :math:`\|S\|_F = \sqrt{c}\,\sqrt{\sum_j s_j^2 \|G_{[j]}\|^2}` (one read of G for its channel norms), and the
  weight takes :math:`W \mathrel{+}= G \odot f` with :math:`f = -k_t \sqrt{c}\, s / l` (one more read of G):
  three passes over G-sized memory against the plain path's ten.
- the small low-rank moments are updated with ``torch._foreach_*`` ops, a chunk of matrices at a time:
  the optimizer passes chunks of at most :data:`CHUNK_ELEMENTS` moment numbers (or one matrix), which
  bounds the step's scratch to the P, R and normalised direction of one chunk.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .functional import NORM_EPS, bias_corrected_step_size, decay_weights, growth_limit
from .projection import LEFT, RIGHT, channel_dim, project, project_back

#: Projected-gradient numbers per chunk of low-rank matrices (the bound on the fast step's scratch).
CHUNK_ELEMENTS = 2**22


def chunk_bounds(sizes: Sequence[int], limit: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges [start, stop) whose sizes sum to at most `limit` (default
    :data:`CHUNK_ELEMENTS`; a larger single item makes a chunk of its own)."""
    limit = CHUNK_ELEMENTS if limit is None else limit
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def fused_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The spec's AdamW (`functional.adamw_update`) for tensors sharing a step, through ``torch._fused_adamw_``.

    Every tensor must have the parameter's dtype and device (the kernel's requirement).
    """
    if not params:
        return
    decay = lr * weight_decay
    if decay >= 1.0:  # the reparametrisation divides by 1 - lr * lambda: decay separately
        fused_adamw(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=0.0)
        torch._foreach_mul_(params, 1.0 - decay)
        return
    kernel_lr = lr * (1.0 - decay)
    kernel_decay = weight_decay / (1.0 - decay) if weight_decay else 0.0
    steps = [torch.tensor(float(step), device=params[0].device)] * len(params)  # read, not advanced, by the kernel
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=kernel_lr, beta1=beta1, beta2=beta2,
        weight_decay=kernel_decay, eps=eps / math.sqrt(1.0 - beta2**step), amsgrad=False, maximize=False,
    )


def _low_rank_directions(
    projected: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
    *, beta1: float, beta2: float, eps: float,
) -> list[torch.Tensor]:
    """`functional.adam_direction` over a list: moments updated in place, M / (sqrt(V) + eps) returned.

    The same operations in the same order as the plain path, so the moments are bit-identical to it.
    """
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, projected, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, projected, projected, value=1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    for exp_avg, denom in zip(exp_avgs, denoms):
        torch.div(exp_avg, denom, out=denom)
    return denoms


def _norms(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Euclidean norms of `x` along `dim` (kept as a size-1 axis), computed in `dtype`.

    On the CPU torch's reduction over dim 0 of a row-major matrix is ~15x slower than over dim 1
    (3.7 ms against 0.22 ms for 768 x 2048 here), so columns are summed as squares, 64 rows at a time
    (a small temporary, not a copy of x).
    """
    if dim == 1 or x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    squares = torch.zeros((1, x.shape[1]), dtype=dtype, device=x.device)
    for block in x.split(64):
        block = block.to(dtype)
        squares += (block * block).sum(0, keepdim=True)
    return squares.sqrt_()


def _project_chunk(grads, projs, sides, shards, dtypes) -> list[torch.Tensor]:
    """R = project(G) for each weight, cast to its moments' dtype. A row-sharded weight projected from the
    left sums its rows' partial products over the ranks (sharded.py), in one all-reduce for the chunk."""
    projected, partial = [], []
    for index, (grad, proj, side, shard, dtype) in enumerate(zip(grads, projs, sides, shards, dtypes)):
        if shard is not None and side == LEFT:
            projected.append((shard.rows_of(proj).T @ grad).to(dtype))
            partial.append(index)
        else:
            projected.append(project(grad, proj, side).to(dtype))
    _all_reduce_many([projected[i] for i in partial], [shards[i] for i in partial])
    return projected


def _all_reduce_many(tensors: list[torch.Tensor], shards: list) -> None:
    """Sum each tensor over its shard's ranks in place: one all-reduce per (process group, dtype)."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for tensor, shard in zip(tensors, shards):
        buckets.setdefault((shard.group, tensor.dtype), []).append(tensor)
    for (group, _), members in buckets.items():
        flat = torch.cat([t.reshape(-1) for t in members])
        torch.distributed.all_reduce(flat, group=group)
        for t, piece in zip(members, flat.split([t.numel() for t in members])):
            t.copy_(piece.view_as(t))


def apollo_updates(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    projs: list[torch.Tensor],
    sides: list[str],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    limiter_norms: list[torch.Tensor | None],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale_type: str,
    scale: float,
    scale_front: bool,
    limiter_gamma: float | None,
    shards: list | None = None,
) -> list[torch.Tensor | None]:
    r"""`functional.apollo_update` for a list of low-rank weights; returns each limiter's new norm (None when off).

    Per weight: R = project(G), R~ = Adam(R), s = scaling factor (channel or tensor), then with
    :math:`n_j = \|G_{[j]}\|_2` (per kept channel, or :math:`\|G\|_F` for tensor scaling)
    :math:`q = \|s \odot G\|_F = \sqrt{\sum_j s_j^2 n_j^2}` (times :math:`\sqrt c` with ``scale_front``),
    limiter :math:`l = \max(q/(p+10^{-8}), \gamma)/\gamma` (1 on the first step), and
    :math:`W \mathrel{+}= G \odot (-k_t \sqrt{c}\, s / l)`, then decay.

    `shards`: a `sharded.RowShard` per weight (None: the whole matrix is here). The tensors are then this
    rank's rows (weights, grads; right-projected moments) or whole (left-projected moments); the norms
    that span rows are summed over ranks as squares, one all-reduce per chunk.
    """
    shards = shards or [None] * len(weights)
    sqrt_scale = math.sqrt(scale)
    projected = _project_chunk(grads, projs, sides, shards, [m.dtype for m in exp_avgs])
    directions = _low_rank_directions(projected, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps)
    # Per weight: its norms (tensor: ||R~||, ||R||, ||G||; channel: ||s * G||) and the factor s when local.
    norms, factors, to_sum = [], [], []
    for i, (r, direction) in enumerate(zip(projected, directions)):
        grad, shard = grads[i], shards[i]
        norm_dtype = torch.promote_types(grad.dtype, torch.float32)
        if scale_type == "tensor":
            values = torch.stack([direction.norm().to(norm_dtype), r.norm().to(norm_dtype),
                                  torch.linalg.vector_norm(grad, dtype=norm_dtype)])
            factors.append(None)
            if shard is not None:
                squares = values.square()
                if sides[i] == LEFT and torch.distributed.get_rank(shard.group) != 0:
                    squares[:2] = 0  # R and R~ are whole on every rank: count them once
                values = squares
        else:
            dim = channel_dim(sides[i])
            factor = _norms(direction, dim, direction.dtype) / (_norms(r, dim, r.dtype) + NORM_EPS)
            channel_norms = _norms(grad, 1 if sides[i] == RIGHT else 0, norm_dtype)
            values = torch.linalg.vector_norm(factor.to(norm_dtype) * channel_norms).reshape(1)
            factors.append(factor)
            if shard is not None:
                values = values.square()
        norms.append(values)
        if shard is not None:
            to_sum.append(i)
    _all_reduce_many([norms[i] for i in to_sum], [shards[i] for i in to_sum])
    for i in to_sum:
        norms[i] = norms[i].sqrt()

    new_norms: list[torch.Tensor | None] = []
    for i, (values, factor) in enumerate(zip(norms, factors)):
        grad, weight = grads[i], weights[i]
        if factor is None:  # tensor scaling
            factor = values[0] / (values[1] + NORM_EPS)
            norm = factor * values[2]
        else:
            norm = values[0]
        coefficient = factor.to(values.dtype) * (-bias_corrected_step_size(lr, beta1, beta2, steps[i]) * sqrt_scale)
        new_norm = None
        if limiter_gamma is not None:
            if scale_front:
                norm = norm * sqrt_scale
            limit = growth_limit(norm, limiter_norms[i], limiter_gamma)
            if limit is None:
                new_norm = norm
            else:
                coefficient = coefficient / limit
                new_norm = norm / limit
        new_norms.append(new_norm)
        weight.addcmul_(grad, coefficient)
        decay_weights(weight, lr, weight_decay)
    return new_norms


def galore_updates(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    projs: list[torch.Tensor],
    sides: list[str],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    shards: list | None = None,
) -> None:
    """`functional.galore_update` for a list of low-rank weights (bit-identical to it when unsharded).

    The back-projection is materialised and then added, as in the plain path: ``addmm_`` would save a pass
    over W but rounds differently, and the update would no longer lie exactly in span(P). A row-sharded
    weight (`shards`, see `apollo_updates`) back-projects onto its own rows.
    """
    shards = shards or [None] * len(weights)
    projected = _project_chunk(grads, projs, sides, shards, [m.dtype for m in exp_avgs])
    directions = _low_rank_directions(projected, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps)
    del projected
    for i, direction in enumerate(directions):
        weight, proj, shard = weights[i], projs[i], shards[i]
        alpha = -bias_corrected_step_size(lr, beta1, beta2, steps[i]) * scale
        if shard is not None and sides[i] == LEFT:
            proj = shard.rows_of(proj)
        weight.add_(project_back(direction.to(weight.dtype), proj, sides[i]), alpha=alpha)
        decay_weights(weight, lr, weight_decay)
