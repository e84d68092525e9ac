r"""8-bit GaLore (``galore_adamw8bit``): GaLore's SVD projection with bitsandbytes' 8-bit block-wise Adam in the subspace.

Implemented from ``shared/reference/PEERS.md`` ("8-bit GaLore") and ALGORITHMS.md (GaLore's projector), not
from the published code. bitsandbytes is optional (``pip install -e .[bnb]``) and imported only when the
optimizer is built or stepped. Per low-rank weight :math:`W \in \mathbb{R}^{m\times n}` with gradient
:math:`G_t` at step t (counted from 1), r the rank, T ``update_proj_gap``, :math:`\alpha` ``scale``:

.. math::
    &P = \text{top-}r \text{ singular vectors of } G_t \text{ (fp32 SVD, cast to } W\text{'s dtype) when }
    (t-1) \bmod T = 0;\quad R_t = G_t P^\top\ (m \ge n) \text{ or } P^\top G_t\ (m < n)\\
    &m \leftarrow \beta_1 m + (1-\beta_1) R_t,\quad v \leftarrow \beta_2 v + (1-\beta_2) R_t^2
    \quad\text{(fp32, from and back to 8-bit codes)}\\
    &N_t = -\eta_t\, \frac{m / (1-\beta_1^t)}{\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon}
    \quad\text{(rounded to } W\text{'s dtype)}\\
    &W \leftarrow W + \alpha\, \mathrm{back}(N_t)\ (N_t P \text{ or } P N_t),\qquad
    W \leftarrow W - \eta_t \lambda W

:math:`N_t` is bitsandbytes' own update: `adam8bit_step` calls ``bitsandbytes.functional.
optimizer_update_8bit_blockwise("adam", ...)`` (``optimizer_update_32bit`` for a state under
``min_8bit_size`` numbers) on a zero tensor of :math:`R_t`'s shape, with the decay 0, exactly as bitsandbytes'
``Adam8bit.update_step`` would on that placeholder. Note :math:`\epsilon` (1e-8) sits on the *bias-corrected*
:math:`\sqrt{\hat v}` (torch.optim.Adam's place), not on the raw :math:`\sqrt v` as in this harness's
``galore``/``apollo`` (ε 1e-6). The moments are kept across refreshes. The decay is decoupled, after the
update, with the plain lr.

Regular tensors (embeddings, lm_head, norms) get plain bitsandbytes 8-bit Adam with decoupled decay applied
first: :math:`W \leftarrow W(1-\eta\lambda)`, then :math:`W \leftarrow W + N_t` (bitsandbytes' AdamW8bit).

8-bit states: m as uint8 codes into the signed dynamic map, v into the unsigned one, one float32 absmax per
block of 256 numbers (bitsandbytes 0.50); a state of fewer than ``min_8bit_size`` (4096) numbers is float32.
The code books are bitsandbytes' fixed maps, rebuilt by the optimizer (not state). State keys per tensor:
``step`` (int), ``state1``/``state2`` (codes or float32 m, v), ``absmax1``/``absmax2`` (8-bit only) and, for a
low-rank weight, ``projection`` (P, in the weight's dtype): tensors and ints, so
``torch.load(weights_only=True)`` restores it and resume is bit-exact. Bytes per m x n low-rank weight
(m <= n, ``std``): P p m r (p bytes per weight number) + 2 r n + 2·4·⌈rn/256⌉ + 8 (`state_bytes`); rn under
``min_8bit_size``: 8 r n + 8 for the moments.

Harness modes: float32 and bf16 weights, CPU and CUDA (bitsandbytes 0.50 has CPU kernels), the meta device
(bitsandbytes' shape-only kernels), layer-wise rebuilds (every setting is a group key). Refused: sharded
DTensor weights (``--fsdp``) and int8 weights (``--weight_quant``).

Deliberate differences from galore-torch 1.0's ``GaLoreAdamW8bit`` (PEERS.md, "Pitfalls"): no update-norm cap
and no zero skipping (galore-torch's old positional arguments turn both on under bitsandbytes 0.50, which
zeroes the update of a low-rank state under 4096 numbers); missing low-rank keys take GaLore's defaults;
``rank >= min(m, n)`` is refused; the weight is never swapped out for a placeholder (the placeholder is a
separate tensor); the state dict holds no projector object.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Iterable

import torch
from torch import nn

from . import quant, sharded
from .optimizer import GaLore
from .factory import GALORE_SCALE
from .projection import (PROJ_TYPE, RANK, UPDATE_PROJ_GAP, project, project_back, projected_shape,
                         projection_shape, projection_side)
from .routing import DEFAULT_TARGETS
from .scratch import adamw8bit as _kernel_scratch, fused_low_rank
from .spec import OptimizerSpec

logger = logging.getLogger(__name__)

NAME = "galore_adamw8bit"
INSTALL_HINT = f"{NAME} needs bitsandbytes: pip install -e .[bnb]"
BLOCK_SIZE = 256  # bitsandbytes' block for 8-bit optimizer states (fixed in 0.50)
MIN_8BIT_SIZE = 4096


@functools.cache
def _functional():
    """bitsandbytes.functional, imported on first use (one-line ImportError without it)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return bnb_functional


# ------------------------------------------------------------------------------------------ the math
def init_state(state: dict[str, Any], shape: tuple[int, ...], device: torch.device, min_8bit_size: int) -> None:
    """Zero Adam moments of `shape` (the weight's, or R's for a low-rank weight), as bitsandbytes lays them out:
    uint8 codes + one float32 absmax per 256-number block from `min_8bit_size` numbers on, float32 below."""
    state["step"] = 0
    numel = math.prod(shape)
    if numel < min_8bit_size:
        for key in ("state1", "state2"):
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        return
    for index in ("1", "2"):
        state["state" + index] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state["absmax" + index] = torch.zeros((-(-numel // BLOCK_SIZE),), dtype=torch.float32, device=device)


def adam8bit_step(target: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], qmaps: tuple[torch.Tensor, ...], *,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """bitsandbytes' Adam step on `target` in place (its ``Optimizer2State.update_step`` for optimizer "adam",
    no update-norm cap, no zero skipping; ``state["step"]`` already incremented):

    W <- W (1 - lr wd);  W <- W - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), in float32.
    """
    functional = _functional()
    if state["state1"].dtype == torch.uint8:
        functional.optimizer_update_8bit_blockwise(
            "adam", grad, target, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0, eps, state["step"], lr,
            qmaps[0], qmaps[1], state["absmax1"], state["absmax2"], weight_decay, gnorm_scale=1.0, skip_zeros=False)
    else:
        functional.optimizer_update_32bit(
            "adam", grad, target, state["state1"], beta1, eps, state["step"], lr, state["state2"], beta2, 0.0, 0.0,
            weight_decay, 1.0, None, max_unorm=0.0, skip_zeros=False)


def galore_adam8bit_update(weight: torch.Tensor, grad: torch.Tensor, proj: torch.Tensor, state: dict[str, Any],
                           qmaps: tuple[torch.Tensor, ...], *, side: str, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float, scale: float) -> None:
    """One 8-bit GaLore step of a low-rank weight (module docstring): R = project(G); N = bitsandbytes' Adam
    update of a zero placeholder from R (decay 0); W <- W + scale * back(N); W <- W - lr wd W."""
    projected = project(grad, proj, side).contiguous()
    update = torch.zeros_like(projected, dtype=weight.dtype)  # bitsandbytes writes -lr * m^ / (sqrt(v^) + eps) here
    adam8bit_step(update, projected, state, qmaps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.0)
    del projected  # freed before the full-size back-projection (scratch model)
    weight.add_(project_back(update, proj, side).mul_(scale))
    if weight_decay != 0.0:
        weight.add_(weight, alpha=-lr * weight_decay)


def state_bytes(shape: tuple[int, ...], rank: int | None = None, *, proj_type: str = "std", weight_bytes: int = 4,
                min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """What `apollo.optimizer_state_bytes` counts for one stepped tensor (no bitsandbytes needed).

    Regular (rank None), N numbers: 2 N + 8 ceil(N / 256) + 8 from `min_8bit_size` numbers on, else 8 N + 8.
    Low-rank m x n: the same for R's r L numbers, plus P (`weight_bytes` per number, r min(m, n) for ``std``).
    """
    if rank is None:
        numel, proj = math.prod(shape), 0
    else:
        side = projection_side(shape, proj_type)
        numel = math.prod(projected_shape(shape, rank, side))
        proj = weight_bytes * math.prod(projection_shape(shape, rank, side))
    if numel < min_8bit_size:
        return proj + 8 * numel + 8
    return proj + 2 * numel + 2 * 4 * -(-numel // BLOCK_SIZE) + 8


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """The spec's formula: `state_bytes` of `param` in its group (P in the weight's dtype)."""
    return state_bytes(tuple(param.shape), group.get("rank"), proj_type=group.get("proj_type", "std"),
                       weight_bytes=param.element_size(), min_8bit_size=group["min_8bit_size"])


# ------------------------------------------------------------------------------------- the optimizer
class GaLoreAdamW8bit(GaLore):
    r"""8-bit GaLore: GaLore's SVD projector (`apollo.optimizer.GaLore`'s groups, checks and refreshes) with
    bitsandbytes' 8-bit block-wise Adam on the projected gradient (module docstring for the math and state).

    Low-rank group keys (a group with ``rank``): ``rank``, ``update_proj_gap=200``, ``proj_type="std"``,
    ``scale=0.25``. Every group: ``lr``, ``betas=(0.9, 0.999)``, ``eps=1e-8`` (on the bias-corrected
    :math:`\sqrt{\hat v}`), ``weight_decay=0.0``, ``min_8bit_size=4096``; ``state_dtype`` None or "float32"
    only (bitsandbytes' layout is fixed). Groups without ``rank`` get bitsandbytes' 8-bit AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, min_8bit_size: int = MIN_8BIT_SIZE,
                 state_dtype: torch.dtype | str | None = None):
        _functional()  # one-line ImportError before anything is built
        self._min_8bit_size = min_8bit_size  # read by _check_group, which torch calls from __init__
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                         fused=False)
        self.defaults["min_8bit_size"] = min_8bit_size

    def step_options(self) -> dict:
        return {}  # always the plain step (bitsandbytes' kernel); min_8bit_size is a group key

    def _check_group(self, group: dict[str, Any], name: str) -> None:
        group.setdefault("min_8bit_size", self._min_8bit_size)
        super()._check_group(group, name)
        size = group["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{name}: min_8bit_size must be an integer >= 0, got {size!r}")
        if group["state_dtype"] not in (None, "float32"):
            raise ValueError(f"{name}: {NAME} keeps uint8 codes with float32 scales (float32 below min_8bit_size); "
                             f"state_dtype must be None or float32, got {group['state_dtype']!r}")
        for param in group["params"]:
            if sharded.is_dtensor(param):
                raise ValueError(f"--fsdp is not supported for {NAME}: bitsandbytes' blockwise 8-bit states do not "
                                 "shard as DTensors")
            if quant.is_quantized(param):
                raise ValueError(f"{NAME} cannot update int8 weights (--weight_quant): it has no int8 weight path")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load keeping every saved dtype: torch casts each state tensor of a float weight to the weight's
        dtype, the uint8 codes included (the base class gives the floating ones back; the codes are given here)."""
        super().load_state_dict(state_dict)
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor) and not value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def _code_books(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """bitsandbytes' signed (m) and unsigned (v) dynamic maps on `device` (fixed, so not part of the state)."""
        if device not in self._qmaps:
            functional = _functional()
            self._qmaps[device] = (functional.create_dynamic_map(signed=True).to(device),
                                   functional.create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    def _step_parameters(self) -> None:
        for group in self.param_groups:
            low_rank = group.get("rank") is not None
            beta1, beta2 = group["betas"]
            settings = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"])
            for param in group["params"]:
                grad = self._gradient(param)
                if grad is None:
                    continue
                if not param.is_contiguous():  # the kernels write the flat storage (as bitsandbytes' update_step)
                    param.data = param.data.contiguous()
                state, qmaps = self.state[param], self._code_books(param.device)
                if not low_rank:
                    if not state:
                        init_state(state, tuple(param.shape), param.device, group["min_8bit_size"])
                    state["step"] += 1
                    adam8bit_step(param, grad.contiguous(), state, qmaps, weight_decay=group["weight_decay"],
                                  **settings)
                    continue
                side = projection_side(param.shape, group["proj_type"])
                if not state:
                    init_state(state, projected_shape(param.shape, group["rank"], side), param.device,
                               group["min_8bit_size"])
                proj = self._projection(param, grad, group, state, side)  # refreshed at (step before) % T == 0
                state["step"] += 1
                galore_adam8bit_update(param, grad, proj, state, qmaps, side=side, weight_decay=group["weight_decay"],
                                       scale=group["scale"], **settings)


# ------------------------------------------------------------------------------------------ routing
#: The option keys `build` accepts (None means the default).
OPTIONS = frozenset({"rank", "update_proj_gap", "proj_type", "scale", "target_modules", "betas", "eps",
                     "min_8bit_size", "state_dtype"})
_OPTIMIZER_KEYS = ("betas", "eps", "min_8bit_size", "state_dtype")


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> GaLoreAdamW8bit:
    """8-bit GaLore over `model`: the attention/MLP Linear weights (`apollo.param_groups`) low-rank, the rest
    bitsandbytes' 8-bit AdamW.

    options (None = default): rank (hidden_size / 4), update_proj_gap (200), proj_type ("std"), scale (0.25),
    target_modules (("attn", "mlp")), betas ((0.9, 0.999)), eps (1e-8), min_8bit_size (4096), state_dtype (None or
    "float32"). Raises ImportError (one line) without bitsandbytes.
    """
    from .factory import _default_rank, param_groups  # factory imports the registry's modules: no cycle here

    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer {NAME!r} does not take option(s) {', '.join(unknown)}")
    options = {key: value for key, value in options.items() if value is not None}
    optimizer_kwargs = {key: options.pop(key) for key in _OPTIMIZER_KEYS if key in options}
    if optimizer_kwargs.get("state_dtype") is torch.float32:
        optimizer_kwargs["state_dtype"] = "float32"
    target_modules = options.pop("target_modules", DEFAULT_TARGETS)
    lowrank = {**GaLoreAdamW8bit.lowrank_defaults, **options}
    if lowrank.get("rank") is None:
        lowrank["rank"] = _default_rank(model)
    groups = param_groups(model, target_modules, **lowrank)  # every trainable parameter covered once
    if any(quant.is_quantized(p) for group in groups for p in group["params"]):
        raise ValueError(f"{NAME} cannot update int8 weights (--weight_quant): it has no int8 weight path")
    logger.info("%s: %d low-rank weights (rank %d, scale %g, T %d), %d regular tensors", NAME,
                len(groups[1]["params"]), lowrank["rank"], lowrank["scale"], lowrank["update_proj_gap"],
                len(groups[0]["params"]))
    return GaLoreAdamW8bit(groups, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)


def low_rank_scratch(param: torch.Tensor, group: dict, *, p: int, device: str) -> dict[str, int]:
    """Bytes of a low-rank weight's update by phase, |R| = r L: ``svd`` (a refresh: GaLore's model), ``project``
    (R, p |R|), ``kernel`` (R and the placeholder, 2 p |R|, beside bitsandbytes' kernel on |R| numbers:
    `apollo.scratch.adamw8bit`, five float32 blocks on the CPU, none on CUDA), ``back`` (the placeholder and
    the full-size back-projection, p |R| + p n); + float32 operands of a half-precision matmul on the CPU."""
    side = projection_side(param.shape, group.get("proj_type", "std"))
    r_size = math.prod(projected_shape(param.shape, group["rank"], side))
    p_size = math.prod(projection_shape(param.shape, group["rank"], side))
    n = param.numel()
    _, svd, _, _, _ = fused_low_rank(param, dict(group, state_dtype=None), name="galore", p=p, device=device)
    kernel = _kernel_scratch(torch.empty(r_size, device="meta"), group, name=NAME, p=p, device=device)
    cpu_half = device == "cpu" and p == 2  # CPU half-precision matmuls run on float32 copies
    return {"svd": svd, "project": p * r_size + (4 * (n + p_size + r_size) if cpu_half else 0),
            "kernel": 2 * p * r_size + kernel,
            "back": p * r_size + p * n + (4 * (r_size + p_size + n) if cpu_half else 0)}


def scratch_bytes(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    """The temporaries of one parameter's update at its worst step (bytes; read by train.memory, checked against
    measured CPU steps in tests/apollo/test_galore8bit.py): regular tensors bitsandbytes' kernel on n numbers,
    low-rank weights the largest phase of `low_rank_scratch` (the SVD at a refresh included)."""
    if group.get("rank") is None:
        return _kernel_scratch(param, group, name=name, p=p, device=device)
    return max(low_rank_scratch(param, group, p=p, device=device).values())


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"rank": 128, "update_proj_gap": 200, "galore_scale": 0.25, "lr": 0.01},
    "7b": {"rank": 1024, "update_proj_gap": 500, "galore_scale": 0.25, "lr": 0.005},
}
SPEC = OptimizerSpec(
    NAME, build, OPTIONS,
    "8-bit GaLore: GaLore's SVD projection, bitsandbytes' 8-bit block-wise Adam in the subspace "
    "(optional dependency: pip install -e .[bnb])",
    aliases=("galore8bit",),
    cli_flags=(RANK, UPDATE_PROJ_GAP, PROJ_TYPE, GALORE_SCALE), default_eps=1e-8, state_bytes=param_state_bytes,
    states_follow_weights=True,  # bitsandbytes' uint8 codes (float32 below min_8bit_size); P in the weights' dtype
    from_groups=GaLoreAdamW8bit, scratch_bytes=scratch_bytes,
    refuses={"weight_quant": "8-bit GaLore has no int8 weight path (bitsandbytes quantises states, not weights)",
             "fsdp": "bitsandbytes' 8-bit states do not shard as DTensors"},
    smoke_lr=1e-2, smoke_options={"rank": 4, "update_proj_gap": 2}, smoke_flags={"rank": 4, "update_proj_gap": 2},
    requires=("bitsandbytes",),
    refresh_option="update_proj_gap",
    recipes=RECIPES,
)
