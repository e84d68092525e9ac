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
- the optimizer passes a chunk of matrices at a time (`step_chunks`): at most :data:`CHUNK_ELEMENTS`
  moment numbers (or one matrix), which bounds the step's scratch to the P, R and normalised direction of
  one chunk; on the CPU also at most :data:`CPU_CHUNK_GRAD_ELEMENTS` gradient numbers, so that a chunk's
  G, read from memory once (for its norms), is still in the cache for its projection and the weight
  update. Within a chunk the small low-rank moments are updated with ``torch._foreach_*`` ops, and the
  per-matrix scalars (scaling factors, limiter, step sizes) are computed as vectors, a few ops per chunk.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .functional import NORM_EPS, bias_corrected_step_size, decay_weights, growth_limit
from .projection import LEFT, RIGHT, channel_dim, project, project_back

#: Projected-gradient numbers per chunk of low-rank matrices (the bound on the fast step's scratch).
CHUNK_ELEMENTS = 2**22
#: Gradient numbers per chunk on the CPU (16 MB of float32, half of this machine's 32 MB L3; 2^20-2^23 were
#: timed at 130M, docs/performance.md): G's norms, its projection and the weight update each read G, and in
#: a small chunk only the first read comes from memory. Larger chunks lose the cache, smaller ones pay more
#: per-chunk overhead.
CPU_CHUNK_GRAD_ELEMENTS = 2**22


def chunk_bounds(sizes: Sequence[int], limit: int | None = None, *,
                 grad_sizes: Sequence[int] | None = None, grad_limit: int | None = None) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges [start, stop) whose `sizes` sum to at most `limit` (default
    :data:`CHUNK_ELEMENTS`) and, when given, whose `grad_sizes` sum to at most `grad_limit`; a single item
    over a limit makes a chunk of its own."""
    limit = CHUNK_ELEMENTS if limit is None else limit
    grad_sizes = grad_sizes if grad_sizes is not None else [0] * len(sizes)
    grad_limit = grad_limit if grad_limit is not None else math.inf
    start, total, grad_total = 0, 0, 0
    for index, (size, grad_size) in enumerate(zip(sizes, grad_sizes)):
        if index > start and (total + size > limit or grad_total + grad_size > grad_limit):
            yield start, index
            start, total, grad_total = index, 0, 0
        total += size
        grad_total += grad_size
    if start < len(sizes):
        yield start, len(sizes)


def step_chunks(moment_sizes: Sequence[int], grad_sizes: Sequence[int], device: torch.device) -> Iterator[tuple[int, int]]:
    """The chunks of one low-rank step: :data:`CHUNK_ELEMENTS` moment numbers at most, and on the CPU
    :data:`CPU_CHUNK_GRAD_ELEMENTS` gradient numbers at most."""
    if device.type == "cpu":
        return chunk_bounds(moment_sizes, grad_sizes=grad_sizes, grad_limit=CPU_CHUNK_GRAD_ELEMENTS)
    return chunk_bounds(moment_sizes)


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


#: The ways of computing the low-rank Adam moments and direction: "foreach" (torch's multi-tensor ops, seven
#: passes over the moments, bit-identical to the plain path) or "compiled" (`torch.compile` of the
#: per-tensor update: one generated kernel reading R, M, V and writing M, V and the direction; for APOLLO's
#: channel scaling also the direction's and R's channel norms, the direction never stored; equal to the
#: plain path up to float round-off, the compiler contracts mul-adds).
ELEMENTWISE_MODES = ("foreach", "compiled")
#: The default mode per device type, for an optimizer built without ``elementwise=`` (APOLLO/GaLore's
#: option; `python -m train --compile_optimizer` passes "compiled"). Timed side by side by
#: `benchmarks/optimizer_step.py --compiled_elementwise` ("[compiled]" rows) and by benchmarks/gpu_check.py
#: on a GPU; foreach stays the default until "compiled" measures faster on a device.
ELEMENTWISE = {"cpu": "foreach"}


def _adam_direction(r: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """M <- b1 M + (1 - b1) R, V <- b2 V + (1 - b2) R^2 (in place), returns M / (sqrt(V) + eps): one tensor."""
    m.mul_(beta1).add_(r, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    return m / (v.sqrt() + eps)


_compiled_adam_direction = torch.compile(_adam_direction, dynamic=False)  # compiled on first use, per shape


def _adam_channel_factor(r: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float, beta2: float, eps: float,
                         dim: int) -> torch.Tensor:
    r"""`_adam_direction`, then APOLLO's channel factor :math:`s = \|\tilde R\|_{dim} / (\|R\|_{dim} + 10^{-8})`
    from it (the direction is not returned: APOLLO scales G, it never applies the direction). Compiled, the
    moments' update and both norms are one generated kernel that never stores the direction."""
    direction = _adam_direction(r, m, v, beta1, beta2, eps)
    return (torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
            / (torch.linalg.vector_norm(r, dim=dim, keepdim=True) + NORM_EPS))


_compiled_adam_channel_factor = torch.compile(_adam_channel_factor, dynamic=False)


def elementwise_mode(device: torch.device, chosen: str | None = None) -> str:
    """"foreach" or "compiled": how the fused step updates the low-rank moments on `device`: `chosen` (an
    optimizer's ``elementwise`` option), else the device's default (:data:`ELEMENTWISE`)."""
    if chosen is not None:
        return chosen
    return ELEMENTWISE.get(device.type, "foreach")


def _low_rank_directions(
    projected: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
    *, beta1: float, beta2: float, eps: float, mode: str = "foreach",
) -> list[torch.Tensor]:
    """`functional.adam_direction` over a list: moments updated in place, M / (sqrt(V) + eps) returned.

    foreach: the same operations in the same order as the plain path, so the moments are bit-identical to
    it; compiled (`mode`, :data:`ELEMENTWISE_MODES`): one kernel per tensor, equal up to round-off.
    """
    if mode == "compiled":
        return [_compiled_adam_direction(r, m, v, beta1, beta2, eps) for r, m, v in zip(projected, exp_avgs, exp_avg_sqs)]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, projected, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, projected, projected, value=1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    for exp_avg, denom in zip(exp_avgs, denoms):
        torch.div(exp_avg, denom, out=denom)
    return denoms


#: Numbers per block of rows in `_norms`' column sums on the CPU (fewer blocks cost less; larger ones gain nothing).
NORM_BLOCK_ELEMENTS = 2**19


def _norms(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Euclidean norms of `x` along `dim` (kept as a size-1 axis), computed in `dtype`.

    On the CPU torch's reduction over dim 0 of a row-major matrix is ~15x slower than over dim 1
    (3.5 ms against 0.15 ms for 768 x 2048 here), so columns are summed as squares a block of rows at a
    time (:data:`NORM_BLOCK_ELEMENTS` numbers: 0.29 ms for 768 x 2048; a 2 MB temporary, not a copy of x).
    """
    if dim == 1 or x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    squares = torch.zeros((1, x.shape[1]), dtype=dtype, device=x.device)
    for block in x.split(max(1, NORM_BLOCK_ELEMENTS // x.shape[1])):
        block = block.to(dtype)
        squares += (block * block).sum(0, keepdim=True)
    return squares.sqrt_()


def _project_chunk(grads, projs, sides, shards, dtypes, *, grad_norms: str | None = None):
    r"""R = project(G) for each weight, cast to its moments' dtype. A row-sharded weight projected from the
    left sums its rows' partial products over the ranks (sharded.py), in one all-reduce for the chunk.

    `grad_norms` ("channel" or "tensor") also returns G's norms for APOLLO's scaling: per kept channel
    (`_norms`), or :math:`\|G\|_F` as a 0-d tensor, each taken just before G's projection, so that the
    second read of G comes from the CPU's cache rather than from memory.
    Returns (projected, norms) with norms None when not asked for.
    """
    projected, partial, norms = [], [], []
    for index, (grad, proj, side, shard, dtype) in enumerate(zip(grads, projs, sides, shards, dtypes)):
        # the norms first: a streaming read of G from memory is faster than the (rank-1) product's
        if grad_norms == "tensor":
            norms.append(_frobenius_norm(grad))
        elif grad_norms == "channel":
            norms.append(_norms(grad, 1 if side == RIGHT else 0, torch.promote_types(grad.dtype, torch.float32)))
        grad, proj = projection_operands(grad, proj)
        if shard is not None and side == LEFT:
            projected.append((shard.rows_of(proj).T @ grad).to(dtype))
            partial.append(index)
        else:
            projected.append(_project(grad, proj, side).to(dtype))
    _all_reduce_many([projected[i] for i in partial], [shards[i] for i in partial])
    return projected, (norms if grad_norms else None)


#: Gradient numbers from which a CPU rank-1 projection is split over the threads (`_project`); below it the
#: split costs more than it saves.
SPLIT_PRODUCT_MIN_ELEMENTS = 2**16


def _project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    r"""`projection.project`, with a float32/float64 rank-1 product on the CPU split over torch's threads.

    A rank-1 projection is a matrix-vector product, and BLAS's (MKL's sgemv/dgemv) runs it on one thread
    here: 30.2 ms (G p) and 19.3 ms (p^T G) for 60 float32 gradients of 2048 x 768 read from memory, against
    13.4 and 13.9 ms for the same products as a batch of ``torch.get_num_threads()`` blocks of rows
    (``torch.bmm``, one block per thread; 2 threads; `benchmarks/cpu_streams.py`). Right (R = G p, (m, 1)):
    each block gives its own rows of R. Left (R = p^T G, (1, n)): the blocks' partial products
    :math:`\sum_b p_b^T G_b` are added, the same sum in another order (one that follows the thread count, as
    BLAS's matrix products' orders do: bit-identical runs need the same threads). bfloat16 keeps torch's own
    product, already the faster one (5.2 against 7.8 ms for 24 gradients of 2048 x 768).
    """
    blocks = torch.get_num_threads()
    rows = grad.shape[0]
    if (min(proj.shape) != 1 or grad.device.type != "cpu" or grad.dtype not in (torch.float32, torch.float64)
            or blocks < 2 or rows % blocks or grad.numel() < SPLIT_PRODUCT_MIN_ELEMENTS or not grad.is_contiguous()):
        return project(grad, proj, side)
    grad_blocks = grad.view(blocks, rows // blocks, grad.shape[1])
    if side == RIGHT:  # proj (1, n): every block of rows times the same p
        return torch.bmm(grad_blocks, proj.T.expand(blocks, -1, -1)).view(rows, 1)
    return torch.bmm(proj.reshape(blocks, 1, rows // blocks), grad_blocks).sum(0)  # proj (m, 1), split like G's rows


def matmul_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a projection matmul as the fused step multiplies them: on the CPU, half-precision
    tensors in float32 (torch's bfloat16 CPU matmul takes a slow path on CPUs without bf16 matrix units:
    128 ms against 1.2 ms in float32 for 1376 x 128 @ 128 x 512 here; its kernels accumulate in float32
    anyway, so the product rounded to bf16 is the same number up to summation order); elsewhere unchanged."""
    if tensors[0].device.type == "cpu" and tensors[0].dtype in (torch.bfloat16, torch.float16):
        return tuple(t.float() for t in tensors)
    return tensors


def projection_operands(grad: torch.Tensor, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G and P as the projection R = project(G) multiplies them: `matmul_operands`, except at rank 1, where
    the product is a matrix-vector one and torch's bf16 kernel for it is fast (11 ms against 32 ms for the
    upcast and the float32 product over 130M's matrices here)."""
    return (grad, proj) if min(proj.shape) == 1 else matmul_operands(grad, proj)


def _frobenius_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||_F as a 0-d tensor in at least float32. A contiguous float32 CPU tensor uses BLAS's dot
    (x . x): ~1.4x faster than torch's norm reduction here, and closer to the float64 value (relative
    error 4e-4 against torch's 3.5e-3 for a random 4096 x 11008 G; 3e-6 against 2e-5 for 2048 x 768)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous():
        flat = x.view(-1)
        return torch.dot(flat, flat).sqrt_()
    return torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32))


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
    elementwise: str | None = None,
) -> list[torch.Tensor | None]:
    r"""`functional.apollo_update` for a list of low-rank weights; returns each limiter's new norm (None when off).

    Per weight: R = project(G), R~ = Adam(R), s = scaling factor (channel or tensor), then with
    :math:`n_j = \|G_{[j]}\|_2` (per kept channel, or :math:`\|G\|_F` for tensor scaling)
    :math:`q = \|s \odot G\|_F = \sqrt{\sum_j s_j^2 n_j^2}` (times :math:`\sqrt c` with ``scale_front``),
    limiter :math:`l = \max(q/(p+10^{-8}), \gamma)/\gamma` (1 on the first step), and
    :math:`W \mathrel{+}= G \odot (-k_t \sqrt{c}\, s / l)`, then decay.

    `shards`: a `sharded.RowShard` per weight (None: the whole matrix is here). The tensors are then this
    rank's rows (weights, grads; right-projected moments) or whole (left-projected moments); the norms
    that span rows are summed over ranks as squares, one all-reduce per chunk. `elementwise`: how the
    low-rank moments are computed (:data:`ELEMENTWISE_MODES`; None: the device's default).
    """
    shards = shards or [None] * len(weights)
    sqrt_scale = math.sqrt(scale)
    mode = elementwise_mode(weights[0].device, elementwise) if weights else "foreach"
    projected, grad_norms = _project_chunk(grads, projs, sides, shards, [m.dtype for m in exp_avgs],
                                           grad_norms=scale_type)
    if scale_type == "channel" and mode == "compiled":
        # one kernel per weight: moments, direction norms, R norms (a channel factor is local to this rank)
        factors = [_compiled_adam_channel_factor(r, m, v, beta1, beta2, eps, channel_dim(side))
                   for r, m, v, side in zip(projected, exp_avgs, exp_avg_sqs, sides)]
        norms = _channel_scaled_norms(factors, grad_norms, sides, shards)
    else:
        directions = _low_rank_directions(projected, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps,
                                          mode=mode)
        factors, norms = _scaling(projected, directions, grad_norms, sides, shards, scale_type=scale_type)
    # The scalars of the whole chunk at once: step sizes, limiter, new limiter norms.
    sizes = [-bias_corrected_step_size(lr, beta1, beta2, t) * sqrt_scale for t in steps]
    if all(size == sizes[0] for size in sizes):  # the usual case: a fill, no copy from the host (no sync on a GPU)
        step_sizes = torch.full_like(norms, sizes[0])
    else:  # weights that started at different steps
        step_sizes = torch.tensor(sizes, dtype=norms.dtype, device=norms.device)
    new_norms: list[torch.Tensor | None] = [None] * len(weights)
    if limiter_gamma is not None:
        if scale_front:
            norms = norms * sqrt_scale
        if all(p is None for p in limiter_norms):  # first step: nothing to limit
            new_norms = list(norms.unbind())
        else:
            # a weight without a previous norm gets p = q: l = max(q / (q + 1e-8), gamma) / gamma = 1 exactly
            previous = torch.stack([norms[i] if p is None else p.to(norms.dtype) for i, p in enumerate(limiter_norms)])
            limits = growth_limit(norms, previous, limiter_gamma)
            step_sizes = step_sizes / limits
            new_norms = list((norms / limits).unbind())
    if scale_type == "tensor":
        coefficients = (factors * step_sizes).unbind()
    else:
        # in G's dtype: a float32 vector against bfloat16 G and W would take torch's slow mixed-dtype path
        # (4x slower here); the plain path rounds the factor to G's dtype too
        coefficients = [(factor.to(norms.dtype) * size).to(grad.dtype)
                        for factor, size, grad in zip(factors, step_sizes.unbind(), grads)]
    for weight, grad, coefficient in zip(weights, grads, coefficients):
        weight.addcmul_(grad, coefficient)
        decay_weights(weight, lr, weight_decay)
    return new_norms


def _scaling(projected, directions, grad_norms, sides, shards, *, scale_type: str):
    r"""APOLLO's scaling factors and the norms of the scaled gradients, for a chunk.

    Returns (factors, q): tensor scaling: a vector of :math:`s = \|\tilde R\|_F / (\|R\|_F + 10^{-8})`, one per
    weight; channel: a list of :math:`s_j` per weight, shaped to broadcast against its G. And
    :math:`q = \|s \odot G\|_F = \sqrt{\sum_j s_j^2 \|G_{[j]}\|^2}` per weight, as a vector (`grad_norms`: G's
    norms, per kept channel or whole). Over a row-sharded weight the norms are summed as squares across ranks.
    """
    norm_dtype = grad_norms[0].dtype
    if scale_type == "tensor":
        direction_norms = torch.stack(torch._foreach_norm(directions, 2, dtype=norm_dtype))
        projected_norms = torch.stack(torch._foreach_norm(projected, 2, dtype=norm_dtype))
        whole_grad_norms = torch.stack(grad_norms)
        if any(shard is not None for shard in shards):
            parts = _norms_over_ranks(torch.stack([direction_norms, projected_norms, whole_grad_norms], dim=1),
                                      sides, shards, whole_if_left=2)
            direction_norms, projected_norms, whole_grad_norms = parts.unbind(1)
        factors = direction_norms / (projected_norms + NORM_EPS)
        return factors, factors * whole_grad_norms
    factors = []
    for r, direction, side in zip(projected, directions, sides):
        dim = channel_dim(side)
        factors.append(_norms(direction, dim, direction.dtype) / (_norms(r, dim, r.dtype) + NORM_EPS))
    return factors, _channel_scaled_norms(factors, grad_norms, sides, shards)


def _channel_scaled_norms(factors, grad_norms, sides, shards) -> torch.Tensor:
    r""":math:`q = \|s \odot G\|_F = \sqrt{\sum_j s_j^2 \|G_{[j]}\|^2}` per weight from its channel factors and G's
    channel norms, as a vector; over a row-sharded weight summed as squares across ranks."""
    norm_dtype = grad_norms[0].dtype
    norms = torch.stack([torch.linalg.vector_norm(factor.to(norm_dtype) * grad_norm)
                         for factor, grad_norm in zip(factors, grad_norms)])
    return _norms_over_ranks(norms[:, None], sides, shards, whole_if_left=0)[:, 0]


def _norms_over_ranks(norms: torch.Tensor, sides, shards, *, whole_if_left: int) -> torch.Tensor:
    """Row i of `norms` holds norms of weight i's pieces on this rank; for a row-sharded weight, return the
    norms of the whole pieces: square roots of the sums of squares over ranks (one all-reduce per chunk).
    Its first `whole_if_left` columns are norms of tensors that a left projection keeps whole on every rank
    (R, R~): those count once."""
    sharded_rows = [i for i, shard in enumerate(shards) if shard is not None]
    if not sharded_rows:
        return norms
    norms = norms.clone()
    squares = []
    for i in sharded_rows:
        row = norms[i].square()
        if sides[i] == LEFT and torch.distributed.get_rank(shards[i].group) != 0:
            row[:whole_if_left] = 0
        squares.append(row)
    _all_reduce_many(squares, [shards[i] for i in sharded_rows])
    for i, row in zip(sharded_rows, squares):
        norms[i] = row.sqrt()
    return norms


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
    elementwise: str | None = None,
) -> None:
    """`functional.galore_update` for a list of low-rank weights (bit-identical to it when unsharded).

    The back-projection is materialised and then added, as in the plain path: ``addmm_`` would save a pass
    over W but rounds differently, and the update would no longer lie exactly in span(P). A row-sharded
    weight (`shards`, see `apollo_updates`) back-projects onto its own rows. `elementwise`: as in
    `apollo_updates`.
    """
    shards = shards or [None] * len(weights)
    mode = elementwise_mode(weights[0].device, elementwise) if weights else "foreach"
    projected, _ = _project_chunk(grads, projs, sides, shards, [m.dtype for m in exp_avgs])
    directions = _low_rank_directions(projected, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps,
                                      mode=mode)
    del projected
    for i, direction in enumerate(directions):
        weight, proj, shard = weights[i], projs[i], shards[i]
        alpha = -bias_corrected_step_size(lr, beta1, beta2, steps[i]) * scale
        if shard is not None and sides[i] == LEFT:
            proj = shard.rows_of(proj)
        low_rank, proj = matmul_operands(direction.to(weight.dtype), proj)
        weight.add_(project_back(low_rank, proj, sides[i]).to(weight.dtype), alpha=alpha)
        decay_weights(weight, lr, weight_decay)
