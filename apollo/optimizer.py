r"""The optimizer classes: validation, parameter groups, lazily created state, and step() bookkeeping.

The math lives in `functional.py` (one tensor at a time, the readable definition) and `fused.py` (the same
update over lists of tensors, fused; the default where it applies, ``fused=False`` forces the plain
path; ``elementwise="compiled"`` compiles its low-rank moment update, ``fused.ELEMENTWISE_MODES``);
projections and seeds in `projection.py`. An int8 weight
(`quant.QuantLinear`) is updated through `quant.float_weight`: its ``float_grad`` is the gradient, a
float32 copy is updated, then re-quantised; its state is float (the gradient's dtype by default).

A param group that carries a ``rank`` is a *low-rank* group (2-D weights only); every other group gets
the AdamW of the spec (epsilon on the uncorrected :math:`\sqrt{V}`, decoupled decay after the update).

State per m x n low-rank weight, with L the kept dimension (max(m, n) for ``proj_type="std"``):

- ``exp_avg``, ``exp_avg_sq``: the low-rank moments, r x L each (2 r L numbers);
- ``step`` (int), ``proj_seed`` (int, random projection), ``limiter_norm`` (0-d float32, when the
  limiter is on): the paper's "2nr + 2" (APOLLO-Mini: "2n + 2");
- ``projection``: P itself, only for SVD projections (data-dependent) or with ``store_projection=True``.

Deliberate differences from the published ``apollo-torch`` package (see ALGORITHMS.md, "[ours]"):

- missing low-rank keys take the defaults in ``APOLLO.lowrank_defaults`` instead of raising KeyError;
- channel scaling is taken along the kept dimension for every ``proj_type``;
- a random P is regenerated from its seed instead of stored (``store_projection=True`` keeps it);
- the state dict holds tensors and ints only (``torch.load(weights_only=True)`` works);
- ``state_dtype="float32"`` keeps the moments in float32 for bfloat16 parameters;
- ``rank >= min(m, n)`` is refused with a ValueError (no compression is possible there) rather than
  silently running a full-size projection;
- the norm-growth limiter treats a stored norm of 0 as "no limit yet" (``functional.growth_limit``): after
  an all-zero gradient (torchtitan's lr-0 state initialisation, a frozen layer) the published code caps
  the next update at 1.01 x 1e-8 and needs ~1,800 steps to recover. Nonzero norms: bit-identical.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from . import functional as F
from . import fused as FF
from . import quant
from . import sharded
from .projection import (PROJ_TYPES, RIGHT, advance_seed, projected_shape, projection_shape, projection_side,
                         random_projection, svd_projection)
from .base import BaseOptimizer, check_hyperparameters
from .state_dtypes import NUMBER_BYTES, STATE_DTYPES as ALL_STATE_DTYPES, state_dtype_name, state_element_size

PROJ_KINDS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
STATE_DTYPES = {name: dtype for name, dtype in ALL_STATE_DTYPES.items() if name != "float64"}


def _state_dtype_name(state_dtype: torch.dtype | str | None) -> str | None:
    """Normalise a state dtype to a string (kept in param groups so that state dicts stay plain)."""
    return state_dtype_name(state_dtype, STATE_DTYPES)


def low_rank_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    r"""Bytes of one weight's state after a step (APOLLO, GaLore, Fira), s bytes a state number (`state_dtype`, else
    the weight's p), n numbers, 8 a Python int.

    A group without ``rank``: Adam's ``step`` + two moments, :math:`8 + 2 s n`. A low-rank m x n weight:
    :math:`8 + 2 s |R|` (R the projected r x L gradient) + P itself (:math:`p |P|`, in the gradient's dtype) for an
    SVD projection or ``store_projection`` + the seed (8) for a random one + ``limiter_norm`` (a 0-d tensor in
    max(float32, p)) when the group's norm-growth limiter is on (APOLLO, Fira; GaLore has none).
    """
    s, p = state_element_size(group, param), param.element_size()
    if group.get("rank") is None:
        return NUMBER_BYTES + 2 * s * param.numel()
    side = projection_side(param.shape, group.get("proj_type", "std"))
    total = NUMBER_BYTES + 2 * s * math.prod(projected_shape(param.shape, group["rank"], side))
    random = group.get("proj", "svd") == "random"
    if not random or group.get("store_projection"):
        total += p * math.prod(projection_shape(param.shape, group["rank"], side))
    if random:
        total += NUMBER_BYTES
    if group.get("norm_growth_limiter"):
        total += max(4, p)
    return total


class _LowRankAdam(BaseOptimizer):
    """Shared bookkeeping for APOLLO, GaLore and Fira: low-rank group checks, regular AdamW groups, state, seeds
    (hyper-parameter checks, closure, int8 zero_grad and dtype-keeping load: `base.BaseOptimizer`)."""

    #: Values a low-rank group takes for keys it does not set. Subclasses extend this.
    lowrank_defaults: dict[str, Any] = {"proj_type": "std", "update_proj_gap": 200}
    #: Whether the fused step computes the low-rank moments through `fused.apollo_updates`/`galore_updates`,
    #: which is what the ``elementwise`` option chooses the kernel of (Fira's step does not).
    takes_elementwise = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        state_dtype: torch.dtype | str | None = None,
        store_projection: bool = False,
        fused: bool = True,
        elementwise: str | None = None,
    ):
        check_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), wording="torch")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            state_dtype=_state_dtype_name(state_dtype),
            store_projection=bool(store_projection),
        )
        # Not group keys: they change how the update is computed, not the update, and old state dicts lack them.
        self.fused = bool(fused)
        if elementwise is not None and not self.takes_elementwise:
            raise ValueError(f"{type(self).__name__}: its step has no compiled moment update; elementwise must be "
                             f"None, got {elementwise!r}")
        if elementwise is not None and elementwise not in FF.ELEMENTWISE_MODES:
            raise ValueError(f"{type(self).__name__}: elementwise must be one of {FF.ELEMENTWISE_MODES} or None "
                             f"(the device's default), got {elementwise!r}")
        self.elementwise = elementwise
        super().__init__(params, defaults)

    def step_options(self) -> dict:
        return {"fused": self.fused, **({"elementwise": self.elementwise} if self.takes_elementwise else {})}

    # ----------------------------------------------------------------- groups
    def _check_group(self, group: dict[str, Any], name: str) -> None:
        check_hyperparameters(group, name, keys=("lr",))
        group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        if group.get("rank") is not None:
            for key, value in self.lowrank_defaults.items():
                group.setdefault(key, value)
            self._validate_lowrank_group(group, name)

    def _validate_lowrank_group(self, group: dict[str, Any], name: str) -> None:
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: rank must be an integer >= 1, got {rank!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{name}: proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{name}: update_proj_gap must be an integer >= 1, got {gap!r}")
        if not group["scale"] > 0:
            raise ValueError(f"{name}: scale must be > 0, got {group['scale']!r}")
        for position, param in enumerate(group["params"]):
            if param.dim() != 2:
                raise ValueError(
                    f"{name}: low-rank groups take 2-D weights only; parameter {position} has shape {tuple(param.shape)}"
                )
            if rank >= min(param.shape):
                raise ValueError(
                    f"{name}: rank {rank} must be smaller than both dimensions of parameter {position} "
                    f"(shape {tuple(param.shape)}); lower --rank or leave this weight out of the low-rank group"
                )

    # ------------------------------------------------------------------ state
    def _state_dtype(self, group: dict[str, Any], param: torch.Tensor) -> torch.dtype:
        return STATE_DTYPES[group["state_dtype"]] or param.dtype

    def _initial_seed(self, param: torch.Tensor) -> int:
        """Seed of a parameter's first random P: its 1-based position counting every parameter of every group.

        A group with ``initial_seed`` numbers its parameters from there instead (layer-wise training builds
        one optimizer per parameter and passes the position the parameter has in the whole model).
        """
        position = 0
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                position += 1
                if p is param:
                    return group["initial_seed"] + index if "initial_seed" in group else position
        raise RuntimeError("parameter not found in this optimizer's param groups")

    def _moments(self, group: dict[str, Any], like: torch.Tensor, state: dict[str, Any], shape, *,
                 param: torch.Tensor | None = None, rows_sharded: bool = True) -> None:
        """Zero moments of `shape` on `like`'s device, in the state dtype (default: `like`'s dtype).

        For a row-sharded (DTensor) `param` the moments are DTensors too: sharded like its rows when
        `rows_sharded` (regular and right-projected weights), replicated otherwise (sharded.py).
        """
        dtype = self._state_dtype(group, like)
        state["step"] = 0
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = sharded.zeros_like_layout(param if param is not None else like, tuple(shape),
                                                   rows_sharded=rows_sharded, dtype=dtype, device=like.device)

    def _projection(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any], side: str):
        """The P of this step: redrawn at steps 1, T+1, 2T+1, ... (pre-increment step % T == 0)."""
        refresh = state["step"] % group["update_proj_gap"] == 0
        rank = group["rank"]
        if group.get("proj", "svd") == "svd":
            if refresh or "projection" not in state:
                shard = sharded.row_shard(param)
                if shard is None:
                    state["projection"] = svd_projection(sharded.local(grad), rank, side)
                else:  # gathered once per refresh; rank 0's P everywhere, so that every rank agrees
                    state["projection"] = shard.broadcast(svd_projection(grad.full_tensor(), rank, side))
            return state["projection"]
        if refresh or "proj_seed" not in state:
            state["proj_seed"] = advance_seed(state["proj_seed"]) if "proj_seed" in state else self._initial_seed(param)
            state.pop("projection", None)
        if "projection" in state:
            return state["projection"]
        if param.device.type == "meta":  # shapes only (train.memory counts state by stepping on the meta device)
            proj = torch.empty(projection_shape(param.shape, rank, side), device="meta", dtype=grad.dtype)
        else:
            proj = random_projection(state["proj_seed"], param.shape, rank, side, device=param.device, dtype=grad.dtype)
        if group["store_projection"]:
            state["projection"] = proj
        return proj

    # ------------------------------------------------------------------- step
    def _step_parameters(self) -> None:
        for group in self.param_groups:
            low_rank = group.get("rank") is not None
            batch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) pairs for the fused path
            for param in group["params"]:
                grad = self._gradient(param)  # .grad, or float_grad of an int8 weight
                if grad is None:
                    continue
                if self._takes_fused_path(param, grad, group, low_rank):
                    batch.append((param, grad))
                    continue
                if sharded.is_dtensor(param):
                    raise ValueError(f"{type(self).__name__}: sharded (DTensor) parameters need the fused step "
                                     "(fused=True, float weights, state dtype = weight dtype for regular groups)")
                # an int8 weight is updated as float32 and re-quantised (state stays keyed by `param`)
                with quant.float_weight(param) as weight:
                    if low_rank:
                        self._step_low_rank(param, grad, group, weight)
                    else:
                        self._step_regular(param, grad, group, weight)
            if batch and low_rank:
                self._step_low_rank_fused(batch, group)
            elif batch:
                self._step_regular_fused(batch, group)

    def _takes_fused_path(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], low_rank: bool) -> bool:
        """Fused unless turned off, for float weights off the meta device; torch's fused AdamW kernel also
        needs the moments in the parameter's dtype."""
        if not self.fused or param.device.type == "meta" or quant.is_quantized(param):
            return False
        return low_rank or self._state_dtype(group, grad) == param.dtype

    # In the two updates below, `param` keys the state and the projection seed, `weight` is the tensor
    # updated in place (`param` itself, or the float32 copy of an int8 weight), and the state and P
    # follow the dtype of `grad` (the parameter's dtype, or the compute dtype of an int8 weight).
    def _step_regular(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], weight: torch.Tensor) -> None:
        state = self.state[param]
        if not state:
            self._moments(group, grad, state, param.shape)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        F.adamw_update(
            weight, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=group["lr"],
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        )

    def _step_low_rank(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], weight: torch.Tensor) -> None:
        """Bookkeeping shared by every low-rank method: moments, this step's P, the step counter; then its update."""
        state = self.state[param]
        side = projection_side(param.shape, group["proj_type"])
        if not state:
            self._moments(group, grad, state, projected_shape(param.shape, group["rank"], side))
        proj = self._projection(param, grad, group, state, side)
        state["step"] += 1
        self._low_rank_update(weight, grad, proj, state, group, side)

    def _low_rank_update(self, weight, grad, proj, state: dict[str, Any], group: dict[str, Any], side: str) -> None:
        """The method's update of `weight` from its gradient, this step's P and its state (APOLLO, GaLore)."""
        raise NotImplementedError(f"{type(self).__name__} defines no low-rank update")

    # The fused path: the same bookkeeping and the same update as above, over lists of tensors (fused.py).
    def _step_regular_fused(self, batch: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """AdamW through torch's fused kernel, one call per (step, device, dtype)."""
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, dict]]] = {}
        for param, grad in batch:
            state = self.state[param]
            if not state:
                self._moments(group, grad, state, param.shape, param=param)
            state["step"] += 1
            buckets.setdefault((state["step"], param.device, param.dtype), []).append((param, grad, state))
        beta1, beta2 = group["betas"]
        local = sharded.local  # elementwise: a shard's update is its part of the whole update
        for (step, _, _), entries in buckets.items():
            FF.fused_adamw(
                [local(p) for p, _, _ in entries], [local(g) for _, g, _ in entries],
                [local(s["exp_avg"]) for _, _, s in entries], [local(s["exp_avg_sq"]) for _, _, s in entries],
                step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"],
            )

    def _step_low_rank_fused(self, batch: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """Low-rank updates a chunk of matrices at a time (`fused.step_chunks`, within one device and dtype,
        whose scalars are computed together): P is drawn per chunk, so the scratch is that of one chunk."""
        buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}
        for param, grad in batch:
            side = projection_side(param.shape, group["proj_type"])
            if not self.state[param]:
                self._moments(group, grad, self.state[param], projected_shape(param.shape, group["rank"], side),
                              param=param, rows_sharded=side == RIGHT)
            buckets.setdefault((grad.device, grad.dtype), []).append((param, grad, side))
        for (device, _), entries in buckets.items():
            moment_sizes = [sharded.local(self.state[param]["exp_avg"]).numel() for param, _, _ in entries]
            grad_sizes = [sharded.local(grad).numel() for _, grad, _ in entries]
            for start, stop in FF.step_chunks(moment_sizes, grad_sizes, device):
                chunk = [(param, grad) for param, grad, _ in entries[start:stop]]
                sides = [side for _, _, side in entries[start:stop]]
                states = [self.state[param] for param, _ in chunk]
                projs = []
                for (param, grad), side, state in zip(chunk, sides, states):
                    projs.append(self._projection(param, grad, group, state, side))
                    state["step"] += 1
                self._low_rank_updates(chunk, projs, sides, states, group)

    @staticmethod
    def _chunk_tensors(chunk, states):
        """This rank's tensors of a chunk: weights, grads, first and second moments, and each weight's shard."""
        local = sharded.local
        return ([local(p) for p, _ in chunk], [local(g) for _, g in chunk], [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states], [sharded.row_shard(p) for p, _ in chunk])

    def _low_rank_updates(self, chunk, projs, sides, states, group: dict[str, Any]) -> None:
        """The method's update of a chunk of (param, grad) pairs (APOLLO, GaLore)."""
        raise NotImplementedError(f"{type(self).__name__} defines no fused low-rank update")


class APOLLO(_LowRankAdam):
    r"""APOLLO: AdamW-level updates with SGD-like memory (arXiv 2412.05270, Algorithm 1).

    For a low-rank weight :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G_t`:

    .. math::
        R_t &= \mathrm{project}(G_t) \quad (G_t P^\top \text{ or } P^\top G_t,\ P \text{ redrawn every } T \text{ steps})\\
        M_t &= \beta_1 M_{t-1} + (1-\beta_1) R_t,\quad V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2,\quad
        \tilde R_t = M_t / (\sqrt{V_t} + \epsilon)\\
        s &= \|\tilde R_t[j]\|_2 / (\|R_t[j]\|_2 + 10^{-8}) \text{ per kept channel } j \ (\texttt{channel}),
        \text{ or } \|\tilde R_t\|_F / (\|R_t\|_F + 10^{-8}) \ (\texttt{tensor})\\
        S_t &= \sqrt{c}\, \mathrm{limiter}(G_t \odot s),\quad
        W \leftarrow W - \eta_t \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} S_t,\quad W \leftarrow W - \eta_t \lambda W

    The limiter (Fira) caps the growth of :math:`\|S_t\|_F` at a factor :math:`\gamma` per step. The moments
    are never reset when P is redrawn. Groups without ``rank`` get the spec's AdamW.

    Low-rank group keys and their defaults (``APOLLO.lowrank_defaults``): ``rank`` (required: it marks
    the group), ``proj="random"`` (or ``"svd"``), ``proj_type="std"``, ``scale_type="channel"``,
    ``scale=1.0``, ``update_proj_gap=200``, ``scale_front=False``, ``norm_growth_limiter=True``,
    ``norm_growth_gamma=1.01``. APOLLO-Mini is ``rank=1, scale_type="tensor", scale=128``
    (see ``apollo.PRESETS``).
    """

    lowrank_defaults = {
        **_LowRankAdam.lowrank_defaults,
        "proj": "random",
        "scale_type": "channel",
        "scale": 1.0,
        "scale_front": False,
        "norm_growth_limiter": True,
        "norm_growth_gamma": 1.01,
    }

    def _validate_lowrank_group(self, group: dict[str, Any], name: str) -> None:
        super()._validate_lowrank_group(group, name)
        if group["proj"] not in PROJ_KINDS:
            raise ValueError(f"{name}: proj must be one of {PROJ_KINDS}, got {group['proj']!r}")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"{name}: scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
        if not group["norm_growth_gamma"] >= 1.0:
            raise ValueError(f"{name}: norm_growth_gamma must be >= 1, got {group['norm_growth_gamma']!r}")

    def _low_rank_update(self, weight, grad, proj, state: dict[str, Any], group: dict[str, Any], side: str) -> None:
        beta1, beta2 = group["betas"]
        new_norm = F.apollo_update(
            weight, grad, proj, state["exp_avg"], state["exp_avg_sq"], state.get("limiter_norm"),
            side=side, step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], scale_type=group["scale_type"], scale=group["scale"],
            scale_front=group["scale_front"],
            limiter_gamma=group["norm_growth_gamma"] if group["norm_growth_limiter"] else None,
        )
        if new_norm is not None:
            state["limiter_norm"] = new_norm

    def _low_rank_updates(self, chunk, projs, sides, states, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        weights, grads, exp_avgs, exp_avg_sqs, shards = self._chunk_tensors(chunk, states)
        new_norms = FF.apollo_updates(
            weights, grads, projs, sides, exp_avgs, exp_avg_sqs, [s.get("limiter_norm") for s in states],
            [s["step"] for s in states], shards=shards, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            scale_type=group["scale_type"], scale=group["scale"], scale_front=group["scale_front"],
            limiter_gamma=group["norm_growth_gamma"] if group["norm_growth_limiter"] else None,
            elementwise=self.elementwise,
        )
        for state, new_norm in zip(states, new_norms):
            if new_norm is not None:
                state["limiter_norm"] = new_norm


class GaLore(_LowRankAdam):
    r"""GaLore-AdamW (arXiv 2403.03507): Adam in an SVD subspace, the update projected back to full rank.

    .. math::
        R_t = \mathrm{project}(G_t),\quad \tilde R_t = M_t / (\sqrt{V_t} + \epsilon),\quad
        W \leftarrow W - \eta_t \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, c\, \mathrm{back}(\tilde R_t),
        \quad W \leftarrow W - \eta_t \lambda W

    P holds the top-r singular vectors of the gradient at steps 1, T+1, ... (right: rows of V^T; left:
    columns of U). Low-rank group keys: ``rank`` (required), ``proj_type="std"``, ``update_proj_gap=200``,
    ``scale=0.25`` (the GaLore paper's ``galore_scale``). State per weight: M, V (r L each) and P.
    """

    lowrank_defaults = {**_LowRankAdam.lowrank_defaults, "scale": 0.25}

    def _validate_lowrank_group(self, group: dict[str, Any], name: str) -> None:
        super()._validate_lowrank_group(group, name)
        if group.get("proj", "svd") != "svd":
            raise ValueError(f"{name}: GaLore projects with the gradient's SVD only, got proj={group['proj']!r}")

    def _low_rank_update(self, weight, grad, proj, state: dict[str, Any], group: dict[str, Any], side: str) -> None:
        beta1, beta2 = group["betas"]
        F.galore_update(
            weight, grad, proj, state["exp_avg"], state["exp_avg_sq"], side=side, step=state["step"],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            scale=group["scale"],
        )

    def _low_rank_updates(self, chunk, projs, sides, states, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        weights, grads, exp_avgs, exp_avg_sqs, shards = self._chunk_tensors(chunk, states)
        FF.galore_updates(
            weights, grads, projs, sides, exp_avgs, exp_avg_sqs, [s["step"] for s in states], shards=shards,
            lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], scale=group["scale"],
            elementwise=self.elementwise,
        )
