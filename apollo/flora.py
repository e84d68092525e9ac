r"""Flora (arXiv 2402.03293): Adafactor whose first moment lives in a seeded random subspace, re-drawn every κ steps.

Implemented from ``shared/reference/PEERS.md`` ("Flora") and the paper, not from the published code. The
math is in the pure functions below (`second_moment_step`, `projection`, `compress`, `decompress`,
`momentum_step`, `flora_update`); `Flora` does the bookkeeping; `build` routes a model's parameters.

Per parameter at step t (counted from 1), G in the working dtype w = max(float32, the weight's dtype):

.. math::
    \hat\beta_t = 1 - t^{-c},\qquad Q = G\odot G + \epsilon_1

(c = ``betas[1]``, 0.8). Factored (a matrix, ``factorize_second_moment``):
:math:`a \leftarrow \hat\beta_t a + (1-\hat\beta_t)\,\mathrm{mean}_{cols} Q` (m numbers),
:math:`b \leftarrow \hat\beta_t b + (1-\hat\beta_t)\,\mathrm{mean}_{rows} Q` (n numbers),
:math:`U = G \odot (a/\bar a)^{-1/2} \otimes b^{-1/2}`; otherwise
:math:`v \leftarrow \hat\beta_t v + (1-\hat\beta_t) Q`, :math:`U = G/\sqrt v`. The momentum is of U.

A matrix m x n is *compressible* when it is factored, :math:`\beta_1 > 0`, :math:`\min(m,n) \ge r` and
:math:`\max/\min \le 4`. Its momentum is :math:`C` (r x n for m < n, else m x r) in the subspace of seed σ:
from σ, :math:`(\sigma_L, \sigma_R)` = two ``randint(0, 2^63-1)`` draws of a CPU generator seeded σ;
m < n: :math:`L = \mathrm{randn}(r, m; \sigma_L)/\sqrt r`, :math:`D(X) = L X`, :math:`E(Y) = L^\top Y`;
else :math:`R = \mathrm{randn}(n, r; \sigma_R)/\sqrt r`, :math:`D(X) = X R`, :math:`E(Y) = Y R^\top`
(drawn on the weight's device in w). Then

.. math::
    \tilde U = (1-\beta_1) U + \beta_1 E_\sigma(C);\quad
    \text{if } t \bmod \kappa = 0:\ \sigma' = \mathrm{next}(\sigma),\ C \leftarrow D_{\sigma'}(E_\sigma(C)),\
    \sigma \leftarrow \sigma';\quad C \leftarrow \beta_1 C + (1-\beta_1) D_\sigma(U)

(κ = ``update_proj_gap``, 1000; C starts at 0, so :math:`\tilde U_1 = (1-\beta_1) U_1`, no bias correction;
next: `apollo.projection.advance_seed`, the last of 15 draws). Any other tensor with :math:`\beta_1 > 0`:
:math:`M \leftarrow \beta_1 M + (1-\beta_1) U`, :math:`\tilde U = M`; :math:`\beta_1 = 0`: :math:`\tilde U = U`.
Finally, with :math:`\mathrm{rms}(X) = \|X\|_2/\sqrt{|X|}`, d = ``clip_threshold``,
:math:`\rho_t = \eta_t \max(\epsilon_2, \mathrm{rms}(W))` (``scale_parameter``; else :math:`\eta_t`):

.. math::
    W \leftarrow W - \lambda\rho_t W - \rho_t\, \tilde U / \max(1, \mathrm{rms}(\tilde U)/d)

(both terms from the pre-step W, in w, written back to the weight's dtype). The initial σ of the i-th
parameter (1-based, over all groups in order) is ``seed`` + i.

State per m x n (m <= n): compressible ``momentum`` r n + ``exp_avg_sq_row`` m + ``exp_avg_sq_col`` n,
``seed`` and ``step`` (ints); another matrix m n + m + n; a vector of n numbers 2n (``exp_avg_sq``,
``momentum``); no momentum at all when β1 = 0 (`state_bytes`). ``state_dtype`` None: the states take the
weight's dtype; "float32" (the harness's default for bf16 weights, and flora-opt's behaviour): float32.

Deliberate differences from flora-opt 0.0.3 (`Flora`): the hyper-parameters are ``betas = (β1, c)``
(β1 0.9 by default, not None; c = −``decay_rate`` = 0.8, the JAX config's ``b2``) and ``eps`` is
:math:`\epsilon_1` (:math:`\epsilon_2` is ``eps2``); β1 = 0 keeps no momentum state (flora-opt stores one
that equals U); the rank has no "None = uncompressed" default in `build` (a quarter of the hidden size,
like APOLLO); the i-th parameter counts the parameters given to the optimizer (flora-opt counts frozen
ones too); the ``rms`` bookkeeping value is not stored; no relative step / warm-up init, no bitsandbytes
quantisation of the states, no ``FloraAccelerator``; refused: int8 weights and sharded DTensor weights.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import nn

from .base import BaseOptimizer, check_hyperparameters
from .projection import RANK, UPDATE_PROJ_GAP, advance_seed
from .routing import check_coverage, trainable
from .scratch import state_number_bytes
from .spec import OptimizerSpec
from . import quant, sharded
from .state_dtypes import STATE_DTYPES, state_dtype_name, state_element_size

logger = logging.getLogger(__name__)

#: largest max(m, n) / min(m, n) of a matrix whose momentum is compressed (flora-opt's rule)
MAX_ASPECT = 4
_SEED_HIGH = 2**63 - 1

# ------------------------------------------------------------------------------------------ the math


def rms(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\|x\|_2 / \sqrt{|x|}` as a 0-d tensor (no host synchronisation)."""
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


def compressible(shape: tuple[int, ...], rank: int | None, *, factored: bool, beta1: float) -> bool:
    """Whether a tensor of `shape` keeps its momentum in a rank-`rank` subspace (2-D, factored, β1 > 0,
    min(m, n) >= r, max/min <= 4)."""
    if rank is None or len(shape) != 2 or not factored or beta1 == 0.0:
        return False
    small, large = min(shape), max(shape)
    return small >= rank and large <= MAX_ASPECT * small


def compressed_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    """C's shape: r x n for m < n (left projection), m x r otherwise."""
    m, n = shape
    return (rank, n) if m < n else (m, rank)


def seed_pair(seed: int) -> tuple[int, int]:
    """(σ_L, σ_R): the first two draws of randint(0, 2^63 - 1) of a CPU generator seeded `seed`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    left, right = torch.randint(0, _SEED_HIGH, (2,), generator=generator).tolist()
    return left, right


def projection(seed: int, shape: tuple[int, int], rank: int, *, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """L = randn(r, m; σ_L)/√r (m < n) or R = randn(n, r; σ_R)/√r, on `device` in `dtype` (meta: shape only)."""
    m, n = shape
    left, right = seed_pair(seed)
    size, draw_seed = ((rank, m), left) if m < n else ((n, rank), right)
    if device.type == "meta":
        return torch.empty(size, device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(draw_seed)
    return torch.randn(size, generator=generator, device=device, dtype=dtype).div_(math.sqrt(rank))


def compress(x: torch.Tensor, proj: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """D(X): L X (m < n) or X R."""
    return proj @ x if shape[0] < shape[1] else x @ proj


def decompress(c: torch.Tensor, proj: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """E(C): Lᵀ C (m < n) or C Rᵀ."""
    return proj.T @ c if shape[0] < shape[1] else c @ proj.T


def second_moment_step(grad: torch.Tensor, state: dict[str, torch.Tensor], *, decay: float, eps: float) -> torch.Tensor:
    r"""Update the Adafactor second moment in `state` (working-dtype tensors, in place) and return U.

    `decay` is :math:`\hat\beta_t`. Factored when `state` has ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (means
    over the last and the second-to-last dimension), else ``exp_avg_sq`` elementwise.
    """
    q = grad.square().add_(eps)
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(decay).add_(q.mean(dim=-1), alpha=1.0 - decay)
        col.mul_(decay).add_(q.mean(dim=-2), alpha=1.0 - decay)
        del q
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        return grad.mul(row_factor).mul_(col.rsqrt().unsqueeze(-2))
    v = state["exp_avg_sq"]
    v.mul_(decay).add_(q, alpha=1.0 - decay)
    del q
    return grad.div(v.sqrt())


def momentum_step(update: torch.Tensor, state: dict[str, Any], *, step: int, beta1: float, rank: int | None,
                  kappa: int) -> torch.Tensor:
    r"""Ũ from U (`update`) and the momentum in `state` (working dtype, updated in place; ``seed`` advanced at
    t mod κ = 0 for a compressed one). See the module docstring; β1 = 0 returns U itself."""
    if beta1 == 0.0:
        return update
    if "seed" not in state:  # a full momentum M
        momentum = state["momentum"]
        momentum.mul_(beta1).add_(update, alpha=1.0 - beta1)
        return momentum
    shape = tuple(update.shape)
    kwargs = dict(device=update.device, dtype=update.dtype)
    proj = projection(state["seed"], shape, rank, **kwargs)
    history = decompress(state["momentum"], proj, shape)  # E_σ(C)
    if step % kappa == 0:  # move the history into the next subspace
        state["seed"] = advance_seed(state["seed"])
        proj = projection(state["seed"], shape, rank, **kwargs)
        state["momentum"].copy_(compress(history, proj, shape))
    state["momentum"].mul_(beta1).add_(compress(update, proj, shape), alpha=1.0 - beta1)
    return history.mul_(beta1).add_(update, alpha=1.0 - beta1)


def flora_update(weight: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], *, step: int, lr: float,
                 beta1: float, decay_exponent: float, eps: float, eps2: float, clip_threshold: float,
                 weight_decay: float, scale_parameter: bool, rank: int | None, kappa: int) -> None:
    """One Flora step of one weight, in place (module docstring). `weight`, `grad` and the tensors of `state`
    are in the working dtype; `state` has ``step`` already incremented to `step`."""
    decay = 1.0 - step ** (-decay_exponent)
    update = second_moment_step(grad, state, decay=decay, eps=eps)
    direction = momentum_step(update, state, step=step, beta1=beta1, rank=rank, kappa=kappa)
    del update
    scale = rms(weight).clamp_(min=eps2).mul_(lr) if scale_parameter else torch.tensor(lr, dtype=weight.dtype,
                                                                                         device=weight.device)
    clip = (rms(direction) / clip_threshold).clamp_(min=1.0)
    if weight_decay != 0.0:
        weight.mul_(1.0 - weight_decay * scale)
    weight.addcmul_(direction, scale / clip, value=-1.0)  # a 0-d factor: no temporary of the weight's size


def state_bytes(shape: tuple[int, ...], rank: int | None, *, beta1: float = 0.9, factored: bool = True,
                state_bytes_per_number: int = 4) -> int:
    """What `apollo.optimizer_state_bytes` counts for one stepped tensor (ints 8 bytes; module docstring)."""
    s = state_bytes_per_number
    numel = math.prod(shape)
    momentum = 0 if beta1 == 0.0 else numel
    if len(shape) >= 2 and factored:
        second = numel // shape[-1] + numel // shape[-2]
        if compressible(shape, rank, factored=True, beta1=beta1):
            return s * (math.prod(compressed_shape(shape, rank)) + second) + 8 + 8
        return s * (momentum + second) + 8
    return s * (momentum + numel) + 8


# ------------------------------------------------------------------------------------- the optimizer


class Flora(BaseOptimizer):
    r"""Flora (module docstring for the math): Adafactor with a compressed, periodically re-drawn momentum.

    Every hyper-parameter lives in the param group (``lr``, ``weight_decay``, ``rank``, ``update_proj_gap`` = κ,
    ``betas`` = (β1, c), ``eps`` = ε1, ``eps2``, ``clip_threshold``, ``scale_parameter``, ``factorize_second_moment``,
    ``seed``, ``state_dtype``, and ``initial_seed``: σ of the group's first parameter, seed + its 1-based
    position), so ``Flora([dict(group, params=[p])])`` with the group's ``initial_seed`` advanced to p's
    position updates p exactly as the joint optimizer does (`apollo.LayerwiseOptimizer` does that for groups
    with a ``rank``). The state holds tensors and ints only (``torch.load(weights_only=True)``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 1000, betas: tuple[float, float] = (0.9, 0.8), eps: float = 1e-30,
                 eps2: float = 1e-3,
                 clip_threshold: float = 1.0, scale_parameter: bool = True, factorize_second_moment: bool = True,
                 seed: int = 0, state_dtype: torch.dtype | str | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                        betas=tuple(betas), eps=eps, eps2=eps2, clip_threshold=clip_threshold,
                        scale_parameter=scale_parameter,
                        factorize_second_moment=factorize_second_moment, seed=seed, state_dtype=state_dtype)
        super().__init__(params, defaults)

    group_label = "Flora"

    def _check_group(self, group: dict[str, Any], name: str) -> None:
        """`_validate`, then sigma of the group's first parameter: seed + its 1-based position over all groups."""
        _validate(group, name)
        before = sum(len(other["params"]) for other in self.param_groups[:-1])
        group.setdefault("initial_seed", group["seed"] + before + 1)

    def _init_state(self, group: dict[str, Any], param: torch.Tensor, index: int) -> dict[str, Any]:
        dtype = STATE_DTYPES[group["state_dtype"]] or param.dtype
        shape = tuple(param.shape)
        state: dict[str, Any] = {"step": 0}
        beta1 = group["betas"][0]
        factored = group["factorize_second_moment"] and param.dim() >= 2
        zeros = dict(dtype=dtype, device=param.device)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **zeros)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **zeros)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **zeros)
        if compressible(shape, group["rank"], factored=factored, beta1=beta1):
            state["seed"] = group["initial_seed"] + index
            state["momentum"] = torch.zeros(compressed_shape(shape, group["rank"]), **zeros)
        elif beta1 != 0.0:
            state["momentum"] = torch.zeros(shape, **zeros)
        return state

    def _step_parameters(self) -> None:
        """One Flora update of every parameter with a gradient (bookkeeping; the math is `flora_update`)."""
        for group in self.param_groups:
            beta1, decay_exponent = group["betas"]
            for index, param in enumerate(group["params"]):
                grad = self._gradient(param)  # int8 weights are refused: this is param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self._init_state(group, param, index))
                state["step"] += 1
                work_dtype = torch.promote_types(param.dtype, torch.float32)
                work = {key: value.to(work_dtype) if isinstance(value, torch.Tensor) else value
                        for key, value in state.items()}
                weight = param if param.dtype == work_dtype else param.to(work_dtype)
                flora_update(weight, grad.to(work_dtype), work, step=state["step"], lr=group["lr"], beta1=beta1,
                             decay_exponent=decay_exponent, eps=group["eps"], eps2=group["eps2"],
                             clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
                             scale_parameter=group["scale_parameter"], rank=group["rank"],
                             kappa=group["update_proj_gap"])
                for key, value in work.items():  # states kept in another dtype than the work: written back
                    if isinstance(value, torch.Tensor):
                        if value is not state[key]:
                            state[key].copy_(value)
                    else:
                        state[key] = value
                if weight is not param:
                    param.copy_(weight)


def _validate(group: dict[str, Any], name: str) -> None:
    """One-line ValueErrors for a bad hyper-parameter of a Flora param group, or a weight it cannot update."""
    group["betas"] = tuple(group["betas"])
    group["state_dtype"] = state_dtype_name(group["state_dtype"], who=name)
    check_hyperparameters(group, name, keys=("lr", "weight_decay"))  # betas: Flora's own rule below
    betas = group["betas"]
    if len(betas) != 2 or not 0.0 <= betas[0] < 1.0 or not betas[1] > 0.0:
        raise ValueError(f"{name}: betas must be (beta1 in [0, 1), second-moment decay exponent c > 0), got {betas!r}")
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{name}: rank must be None or an integer >= 1, got {rank!r}")
    kappa = group["update_proj_gap"]
    if isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1:
        raise ValueError(f"{name}: update_proj_gap (kappa) must be an integer >= 1, got {kappa!r}")
    for key in ("eps", "eps2"):
        if not group[key] >= 0.0:
            raise ValueError(f"{name}: {key} must be >= 0, got {group[key]!r}")
    if not group["clip_threshold"] > 0.0:
        raise ValueError(f"{name}: clip_threshold must be > 0, got {group['clip_threshold']!r}")
    for param in group["params"]:
        if sharded.is_dtensor(param):
            raise ValueError("--fsdp is not supported for flora: its factored second moment and projections need "
                             "whole matrices (sharded DTensor parameter)")
        if quant.is_quantized(param):
            raise ValueError("flora cannot update int8 weights (--weight_quant): it has no int8 weight path")


# ------------------------------------------------------------------------------------------ routing

#: Options `build` accepts, with their defaults (rank None: a quarter of the hidden size).
DEFAULTS: dict[str, Any] = {"rank": None, "update_proj_gap": 1000, "betas": (0.9, 0.8), "eps": 1e-30, "eps2": 1e-3,
                            "clip_threshold": 1.0, "scale_parameter": True, "factorize_second_moment": True, "seed": 0,
                            "state_dtype": None}
OPTIONS: frozenset[str] = frozenset(DEFAULTS)


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> Flora:
    """Flora over `model`: every trainable matrix in the "matrices" group (compressed where `compressible`:
    LLaMA's attention and MLP weights, not embed_tokens / lm_head), everything else in "vectors".

    options (None = default): rank (a quarter of config.hidden_size), update_proj_gap κ 1000, betas (0.9, 0.8) =
    (β1, c), eps 1e-30 (ε1), eps2 1e-3, clip_threshold 1.0, scale_parameter True, factorize_second_moment True,
    seed 0, state_dtype None (follow the weights; "float32" for bfloat16 weights). int8 weights are refused.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'flora' does not take option(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(OPTIONS))}")
    settings = {**DEFAULTS, **{key: value for key, value in options.items() if value is not None}}
    if settings["rank"] is None:
        from .factory import _default_rank  # factory imports the registry's modules: imported here, no cycle
        settings["rank"] = _default_rank(model)
    params = [p for p in model.parameters() if trainable(p)]
    if any(quant.is_quantized(p) for p in params):
        raise ValueError("flora cannot update int8 weights (--weight_quant): it has no int8 weight path")
    groups = [{"params": [p for p in params if p.dim() == 2], "name": "matrices"},
              {"params": [p for p in params if p.dim() != 2], "name": "vectors"}]
    groups = [group for group in groups if group["params"]]
    check_coverage(model, groups, "flora")
    factored, beta1 = settings["factorize_second_moment"], tuple(settings["betas"])[0]
    kept = [p for p in params if compressible(tuple(p.shape), settings["rank"], factored=factored, beta1=beta1)]
    logger.info("flora: %d matrices with a rank-%d momentum (%.2fM values), %d tensors with a full one", len(kept),
                settings["rank"], sum(p.numel() for p in kept) / 1e6, len(params) - len(kept))
    return Flora(groups, lr=lr, weight_decay=weight_decay, **settings)


def scratch_bytes(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    """The temporaries of `flora_update` for one parameter (bytes; its spec's scratch model, read by train.memory
    and checked against a measured CPU step in tests/train/test_memory.py): the work copies in w = max(p, 4)
    bytes of the gradient, U and the momentum (compressed: 2 w n + w (r min(m, n) + |C|)), float32 copies of a
    half-precision gradient and weight, and of states kept in p bytes."""
    n, shape, w = param.numel(), tuple(param.shape), max(p, 4)
    s = state_number_bytes(group, p)
    beta1, rank = group["betas"][0], group.get("rank")
    factored = group.get("factorize_second_moment", True) and param.dim() >= 2
    momentum = 0 if beta1 == 0.0 else n
    if compressible(shape, rank, factored=factored, beta1=beta1):
        compressed = math.prod(compressed_shape(shape, rank))
        work, states = 2 * w * n + w * (rank * min(shape) + compressed), compressed + sum(shape)
    elif factored:
        means = n // shape[-1] + n // shape[-2]
        work, states = w * (n + means), momentum + means
    else:
        work, states = 2 * w * n, momentum + n
    return work + (2 * w * n if p != w else 0) + (w * states if s != w else 0)


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """The spec's formula: `state_bytes` of `param` with its group's rank, beta1, factoring and state dtype."""
    return state_bytes(tuple(param.shape), group["rank"], beta1=group["betas"][0],
                       factored=group["factorize_second_moment"], state_bytes_per_number=state_element_size(group, param))


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"rank": 128, "update_proj_gap": 1000, "beta1": 0.9, "lr": 0.01},
    "130m": {"rank": 256, "update_proj_gap": 1000, "beta1": 0.9, "lr": 0.01},
    "350m": {"rank": 256, "update_proj_gap": 1000, "beta1": 0.9, "lr": 0.01},
    "1b": {"rank": 512, "update_proj_gap": 1000, "beta1": 0.9, "lr": 0.01},
}
SPEC = OptimizerSpec(
    "flora", build, OPTIONS,
    "Flora: Adafactor with its momentum in a seeded random rank-r subspace, re-drawn every kappa steps",
    cli_flags=(RANK, UPDATE_PROJ_GAP),  # κ: the harness's name for the refresh gap
    flag_help={"update_proj_gap": "kappa, updates between re-drawn projections (default 1000)"},
    default_betas=(0.9, 0.8),  # (beta1, c): beta2 is Adafactor's decay exponent, beta_hat_t = 1 - t^(-c)
    default_eps=DEFAULTS["eps"], from_groups=Flora, state_bytes=param_state_bytes, scratch_bytes=scratch_bytes,
    refuses={"weight_quant": "Flora has no int8 weight path",
             "fsdp": "Flora's factored second moment and projections need whole matrices (no DTensor path)"},
    # rank 4 with the relative step is too noisy for a loss test on the tiny model; kappa 2 re-draws at the save
    smoke_lr=1e-2, smoke_options={"rank": 16, "update_proj_gap": 2, "scale_parameter": False},
    smoke_flags={"rank": 4, "update_proj_gap": 2},
    refresh_option="update_proj_gap",
    recipes=RECIPES,
)
