r"""Fira (arXiv 2410.01623): GaLore's low-rank Adam plus the gradient left outside the subspace, scaled.

`fira_update` is the math of one weight (a pure function); `Fira` is the bookkeeping, inherited from
`optimizer._LowRankAdam` (group checks, regular Adam groups, state dtype, SVD refreshes, int8 weights,
load_state_dict); `build` routes a model's parameters. Written from ``PEERS.md`` ("Fira") alone.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from . import scratch
from .spec import APOLLO_PAPER_60M, SCALE_RUNS_60M, OptimizerSpec
from . import functional as F
from .routing import DEFAULT_TARGETS
from . import sharded
from .fused import matmul_operands
from .optimizer import _LowRankAdam, low_rank_state_bytes
from .projection import LEFT, PROJ_TYPE, RANK, RIGHT, UPDATE_PROJ_GAP
from .spec import Flag

logger = logging.getLogger(__name__)


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype` (on the CPU half-precision operands are multiplied in float32, `fused.matmul_operands`)."""
    a, b = matmul_operands(a.to(dtype), b.to(dtype))
    return (a @ b).to(dtype)


def fira_update(
    weight: torch.Tensor,
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
    alpha: float,
    paper_form: bool,
    limiter_gamma: float | None,
    shard: sharded.RowShard | None = None,
) -> torch.Tensor | None:
    r"""One Fira step of one low-rank weight, in place; returns the limiter's new norm (None when it is off).

    .. math::
        R = \mathrm{project}(G),\quad N = \mathrm{Adam}(R),\quad
        \varphi = \|N_{[j]}\| / (\|R_{[j]}\| + 10^{-8}) \text{ per kept channel } j\\
        \text{code: } S = \varphi \odot (G - \alpha B(R)),\quad \text{paper: } S = \varphi \odot (G - B(R))\\
        S \leftarrow \mathrm{limiter}_\gamma(S),\quad
        \text{code: } W \mathrel{-}= \eta c_t (\alpha B(N) + S),\quad \text{paper: } W \mathrel{-}= \eta c_t \alpha (B(N) + S)

    then :math:`W \mathrel{-}= \eta\lambda W`. Full-size arithmetic (B(R), S, B(N)) is in G's dtype, the moments and
    :math:`\varphi` in the state dtype, the limiter's norm in at least float32. Scratch: two m x n temporaries
    (on the CPU, half-precision products are formed in float32 first: `fused.matmul_operands`).

    `shard`: `weight` and `grad` are this rank's rows of a row-sharded matrix (`sharded.RowShard`). A left
    projection then sums :math:`P_{\text{rows}}^\top G_{\text{rows}}` over the ranks (the moments are whole on
    every rank) and back-projects with its rows of P; a right projection is row-local. :math:`\|S\|` sums its
    squares over the ranks.
    """
    dtype = grad.dtype
    local_proj = shard.rows_of(proj) if shard is not None and side == LEFT else proj
    if side == RIGHT:
        projected = _product(grad, proj.T, dtype)  # (m, r)
    elif shard is None:
        projected = _product(proj.T, grad, dtype)  # (r, n)
    else:  # a sum over every rank's rows, taken in at least float32
        wide = torch.promote_types(dtype, torch.float32)
        projected = shard.all_reduce(_product(local_proj.T, grad, wide)).to(dtype)
    normalized = F.adam_direction(projected, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps)
    phi = F.scaling_factor(projected, normalized, scale_type="channel", side=side).to(dtype)

    def back(low_rank: torch.Tensor) -> torch.Tensor:  # B(X) = P X or X Q, on this rank's rows
        return _product(local_proj, low_rank, dtype) if side == LEFT else _product(low_rank, proj, dtype)

    residual = back(projected).mul_(-1.0 if paper_form else -alpha).add_(grad)  # G - alpha B(R), or (I - PP^T) G
    del projected
    update = residual.mul_(phi)  # S
    new_norm = None
    if limiter_gamma is not None:
        norm_dtype = torch.promote_types(dtype, torch.float32)
        if shard is None:
            norm = torch.linalg.vector_norm(update, dtype=norm_dtype)
        else:
            norm = shard.all_reduce(torch.linalg.vector_norm(update, dtype=norm_dtype).square()).sqrt()
        limit = F.growth_limit(norm, limiter_norm, limiter_gamma)
        if limit is None:  # first step: nothing to compare with
            new_norm = norm
        else:
            update.div_(limit.to(dtype))
            new_norm = norm / limit
    step_size = F.bias_corrected_step_size(lr, beta1, beta2, step)
    if paper_form:
        update.add_(back(normalized))
        step_size *= alpha
    else:
        update.add_(back(normalized), alpha=alpha)
    weight.add_(update.to(weight.dtype), alpha=-step_size)
    F.decay_weights(weight, lr, weight_decay)
    return new_norm


class Fira(_LowRankAdam):
    r"""Fira: Adam on an SVD projection of the gradient, plus the rest of the gradient scaled by Adam's effect.

    For a low-rank weight :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G` (``proj_type="std"``):

    .. math::
        &P = U_{[:, :r]} \ (m < n,\ R = P^\top G,\ r\times n) \quad\text{or}\quad Q = V^\top_{[:r]}
        \ (m \ge n,\ R = G Q^\top,\ m\times r), \text{ from an fp32 SVD of } G \text{ at } t = 0, T, 2T, \dots\\
        &B(X) = P X \text{ or } X Q \quad\text{(back-projection, no } \alpha)\\
        &M \leftarrow \beta_1 M + (1-\beta_1) R,\quad V \leftarrow \beta_2 V + (1-\beta_2) R^2,\quad
        N = M / (\sqrt V + \epsilon),\quad c_t = \sqrt{1-\beta_2^t} / (1-\beta_1^t)\\
        &\varphi_j = \|N_{:,j}\| / (\|R_{:,j}\| + 10^{-8}) \text{ (left, per column)},\quad
        \varphi_i = \|N_{i,:}\| / (\|R_{i,:}\| + 10^{-8}) \text{ (right, per row)}\\
        &S = \varphi \odot (G - \alpha B(R))\\
        &\text{limiter: first step } s = \|S\|_F; \text{ then } \ell = \max(\|S\|_F / (s + 10^{-8}), \gamma)/\gamma,
        \ S \leftarrow S/\ell,\ s \leftarrow \|S\|_F^{\text{before}} / \ell\\
        &W \leftarrow W - \eta_t c_t (\alpha B(N) + S),\quad\text{then}\quad W \leftarrow W - \eta_t \lambda W

    The weight decay is decoupled and comes *after* the update, with the plain lr (no :math:`c_t`): the same
    place and form as the base class's regular Adam groups and every APOLLO/GaLore update here.
    The moments are kept across SVD refreshes (not reset), as in GaLore.

    ``paper_form=True`` is the paper's Algorithm 1: :math:`S = \varphi \odot (I - PP^\top) G` (right:
    :math:`\varphi \odot G (I - Q^\top Q)`) and :math:`W \leftarrow W - \eta_t c_t \alpha (B(N) + S)`, with the
    limiter on S as above. PEERS.md writes this step as :math:`W - \eta\alpha(PN + S)`; its :math:`PN` is the
    paper's (bias-corrected) Adam output, which this harness writes, as everywhere, as :math:`c_t N` with
    epsilon on the uncorrected :math:`\sqrt V`, so :math:`c_t` applies in both forms. The two forms differ in
    the residual (:math:`G - \alpha B(R)` against :math:`G - B(R)`) and in :math:`\alpha` scaling S (paper) or
    not (code). Default: the code's form, which produced the published numbers.

    Groups without ``rank`` get the base class's Adam (epsilon on the uncorrected :math:`\sqrt V`, bias
    correction in the step size, the same decoupled decay; torch's fused AdamW kernel when ``fused``).

    Low-rank group keys and defaults (``Fira.lowrank_defaults``): ``rank`` (required: it marks the group),
    ``update_proj_gap=200`` (T), ``proj_type="std"`` (``reverse_std``, ``left``, ``right``), ``alpha=0.25``,
    ``norm_growth_limiter=True``, ``norm_growth_gamma=1.01``, ``paper_form=False``. ``scale`` is refused (it
    is called ``alpha`` here) and so is ``proj`` other than ``"svd"``.

    State per m x n low-rank weight, r the rank, L = the kept dimension (max(m, n) for ``std``), l the other:
    ``projection`` (P: l r numbers, in the gradient's dtype), ``exp_avg`` and ``exp_avg_sq`` (2 L r, state
    dtype), ``limiter_norm`` (1 number, a 0-d tensor in float32, float64 for float64 weights; absent with the
    limiter off) and ``step`` (a Python int, 8 bytes in `apollo.optimizer_state_bytes`): for m <= n,
    :math:`mr + 2nr + 1` numbers and one int. ``store_projection`` has no effect (an SVD P is always kept).

    Sharded (FSDP2 ``Shard(0)`` DTensor) weights take the fused path (``fused=True``, the default) and get the
    update of the whole matrix (`fira_update`'s `shard`); the plain path refuses them. int8 weights
    (`quant.QuantLinear`) are updated as float32 copies and re-quantised (the base class). On the meta device
    the step runs on shapes only.

    Deliberate differences from the published code as PEERS.md describes it: missing low-rank keys take the
    defaults above; ``rank >= min(m, n)`` is refused; the SVD is fp32 and P is cast to the gradient's dtype;
    the state dict holds tensors and ints only; ``state_dtype="float32"`` keeps float32 moments for bf16
    weights; the paper's form is an option; a limiter norm of 0 (after an all-zero gradient) means "no limit
    yet" (`functional.growth_limit`).
    """

    takes_elementwise = False  # its fused path runs the plain per-matrix update (bit-identical)

    lowrank_defaults = {
        **_LowRankAdam.lowrank_defaults,
        "alpha": 0.25,
        "norm_growth_limiter": True,
        "norm_growth_gamma": 1.01,
        "paper_form": False,
    }

    def _validate_lowrank_group(self, group: dict[str, Any], name: str) -> None:
        if "scale" in group:
            raise ValueError(f"{name}: Fira has no 'scale' key; GaLore's scale is Fira's alpha (got scale={group['scale']!r})")
        if group.get("proj", "svd") != "svd":
            raise ValueError(f"{name}: Fira projects with the gradient's SVD only, got proj={group['proj']!r}")
        alpha = group["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{name}: alpha must be a number > 0, got {alpha!r}")
        for key in ("norm_growth_limiter", "paper_form"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{name}: {key} must be True or False, got {group[key]!r}")
        gamma = group["norm_growth_gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1.0:
            raise ValueError(f"{name}: norm_growth_gamma must be a number >= 1, got {gamma!r}")
        super()._validate_lowrank_group(dict(group, scale=1.0), name)  # rank, proj_type, T, shapes

    def _update(self, weight, grad, proj, exp_avg, exp_avg_sq, state: dict[str, Any], group: dict[str, Any],
                side: str, shard) -> None:
        beta1, beta2 = group["betas"]
        new_norm = fira_update(
            weight, grad, proj, exp_avg, exp_avg_sq, state.get("limiter_norm"), side=side, step=state["step"],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            alpha=group["alpha"], paper_form=group["paper_form"],
            limiter_gamma=group["norm_growth_gamma"] if group["norm_growth_limiter"] else None, shard=shard,
        )
        if new_norm is not None:
            state["limiter_norm"] = new_norm

    def _low_rank_update(self, weight, grad, proj, state: dict[str, Any], group: dict[str, Any], side: str) -> None:
        """The plain path (``fused=False``, int8 weights, the meta device): one whole matrix."""
        self._update(weight, grad, proj, state["exp_avg"], state["exp_avg_sq"], state, group, side, None)

    def _low_rank_updates(self, chunk, projs, sides, states, group: dict[str, Any]) -> None:
        """The fused path: the same per-matrix update (bit-identical to the plain one), on this rank's rows
        of a sharded weight (and the local tensors of its moments)."""
        weights, grads, exp_avgs, exp_avg_sqs, shards = self._chunk_tensors(chunk, states)
        for i, state in enumerate(states):
            self._update(weights[i], grads[i], projs[i], exp_avgs[i], exp_avg_sqs[i], state, group, sides[i], shards[i])


#: The option keys `build` accepts (each has a default; None also means the default).
OPTIONS = frozenset({
    "rank", "update_proj_gap", "proj_type", "alpha", "norm_growth_limiter", "norm_growth_gamma", "paper_form",
    "target_modules", "betas", "eps", "state_dtype", "store_projection", "fused",
})
_OPTIMIZER_KEYS = ("betas", "eps", "state_dtype", "store_projection", "fused")


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> torch.optim.Optimizer:
    """Fira over `model`: the attention/MLP Linear weights (`apollo.param_groups`) low-rank, the rest plain Adam.

    Options (None = the default): rank (hidden_size / 4), update_proj_gap (200), proj_type ("std"), alpha (0.25),
    norm_growth_limiter (True), norm_growth_gamma (1.01), paper_form (False), target_modules (("attn", "mlp")),
    betas ((0.9, 0.999)), eps (1e-6), state_dtype (None: the parameter's), store_projection (False, no effect),
    fused (True).
    """
    from .factory import _default_rank, param_groups  # factory imports optimizer.py: imported here, no cycle

    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'fira' does not take option(s) {', '.join(unknown)}")
    options = {key: value for key, value in options.items() if value is not None}
    optimizer_kwargs = {key: options.pop(key) for key in _OPTIMIZER_KEYS if key in options}
    target_modules = options.pop("target_modules", DEFAULT_TARGETS)
    lowrank = {**Fira.lowrank_defaults, **options}
    if lowrank.get("rank") is None:
        lowrank["rank"] = _default_rank(model)
    groups = param_groups(model, target_modules, **lowrank)  # checks every trainable parameter is covered once
    logger.info("fira: %d low-rank weights (rank %d, alpha %g, T %d, %s form), %d plain Adam tensors",
                len(groups[1]["params"]), lowrank["rank"], lowrank["alpha"], lowrank["update_proj_gap"],
                "paper" if lowrank["paper_form"] else "code", len(groups[0]["params"]))
    return Fira(groups, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)


FIRA_ALPHA = Flag("fira_alpha", float, "Fira: scale alpha of the low-rank update and its residual (default 0.25; "
                                       "0.0625 published at 1B/7B)", "alpha", above=0.0)
FIRA_PAPER_FORM = Flag("fira_paper_form", bool, "Fira: the paper's residual phi (I - PP^T) G with alpha on both terms "
                                                "(default: the published code's phi (G - alpha PR))", "paper_form",
                       default=False)


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"rank": 128, "update_proj_gap": 200, "fira_alpha": 0.25, "lr": 0.01},
    "130m": {"rank": 256, "update_proj_gap": 200, "fira_alpha": 0.25, "lr": 0.01},
    "350m": {"rank": 256, "update_proj_gap": 200, "fira_alpha": 0.25, "lr": 0.01},
    "1b": {"rank": 512, "update_proj_gap": 200, "fira_alpha": 0.0625, "lr": 0.01},
}
SPEC = OptimizerSpec(
    "fira", build, OPTIONS, "Fira: GaLore + the norm-scaled residual outside the subspace, limiter on the residual",
    aliases=("fira_adamw",), from_groups=Fira, state_bytes=low_rank_state_bytes, scratch_bytes=scratch.fira,
    cli_flags=(RANK, UPDATE_PROJ_GAP, PROJ_TYPE, FIRA_ALPHA, FIRA_PAPER_FORM), default_eps=1e-6,
    smoke_options={"rank": 4, "update_proj_gap": 2}, smoke_flags={"rank": 4, "update_proj_gap": 2, "fira_alpha": 0.25},
    published={APOLLO_PAPER_60M: 31.06, SCALE_RUNS_60M: 30.34},
    refresh_option="update_proj_gap",
    recipes=RECIPES,
)
