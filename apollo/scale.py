r"""SCALE: column-normalised SGD with last-layer momentum (arXiv 2506.16659), and AdamW for the norms.

Implemented from the mathematics in ``shared/reference/PEERS.md`` ("SCALE"), not from the published code.
`build(model, lr, ...)` routes a model's parameters (one function, counts logged); `SCALE` is the optimizer.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import nn

from . import scratch
from .spec import SCALE_RUNS_60M, Flag, OptimizerSpec
from . import quant, sharded
from .base import BaseOptimizer, check_hyperparameters
from .routing import check_coverage, trainable
from .optimizer import STATE_DTYPES, _state_dtype_name
from .state_dtypes import NUMBER_BYTES, state_element_size

logger = logging.getLogger(__name__)

RULES = ("column_norm", "momentum_column_norm", "adamw")
NORMS = ("rms", "l2")
#: N(X) divides by max(norm, NORM_FLOOR): a channel whose gradient is all zero gets a zero update.
NORM_FLOOR = 1e-8

# ------------------------------------------------------------------------------------------ the math


def inverse_norms(x: torch.Tensor, *, norm_dim: int, norm: str, shard: sharded.RowShard | None = None) -> torch.Tensor:
    r"""The factor :math:`1/\max(\nu, 10^{-8})` of N(X), shaped to broadcast against `x` (keepdim on `norm_dim`).

    :math:`\nu` is taken over dimension `norm_dim` of the 2-D `x`: ``norm="rms"``
    :math:`\nu = \sqrt{\tfrac1K\sum_k x_k^2}` (K entries along `norm_dim`), ``norm="l2"``
    :math:`\nu = \sqrt{\sum_k x_k^2}`. In max(float32, x.dtype). `shard`: `x` is this rank's rows of a
    row-sharded matrix; a norm over rows (``norm_dim=0``) sums its squares over the ranks (one
    all-reduce of n numbers) and K is the global row count. Over dim 1 every row is local.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    squares = torch.linalg.vector_norm(x, 2, dim=norm_dim, keepdim=True, dtype=dtype).square_()
    count = x.shape[norm_dim]
    if shard is not None and norm_dim == 0:
        shard.all_reduce(squares)
        count = shard.shape[0]
    if norm == "rms":
        squares.div_(count)
    return squares.sqrt_().clamp_(min=NORM_FLOOR).reciprocal_()


def _factor_for(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The factor in x's dtype where that dtype has float32's range (bfloat16: torch's mixed-dtype CPU path is
    slow); float16 keeps float32, since 1/rms of a small float16 gradient overflows it (1e-8 floor: 1e8)."""
    return factor if x.dtype == torch.float16 else factor.to(x.dtype)


def column_norm_update(weight: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float, norm_dim: int,
                       norm: str, shard: sharded.RowShard | None = None) -> None:
    """W <- (1 - lr wd) W - lr N(G), in place (no state)."""
    factor = _factor_for(inverse_norms(grad, norm_dim=norm_dim, norm=norm, shard=shard), grad)
    if weight_decay != 0.0:
        weight.mul_(1.0 - lr * weight_decay)
    weight.addcmul_(grad, factor, value=-lr)


def momentum_column_norm_update(weight: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, *, lr: float,
                                weight_decay: float, momentum: float, norm_dim: int, norm: str,
                                shard: sharded.RowShard | None = None) -> None:
    """M <- mu M + (1 - mu) G (no bias correction); W <- (1 - lr wd) W - lr N(M), in place."""
    buffer.mul_(momentum).add_(grad.to(buffer.dtype), alpha=1.0 - momentum)
    factor = _factor_for(inverse_norms(buffer, norm_dim=norm_dim, norm=norm, shard=shard), buffer)
    if weight_decay != 0.0:
        weight.mul_(1.0 - lr * weight_decay)
    weight.addcmul_(buffer, factor, value=-lr)


def adamw_update(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                 step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    r"""AdamW with epsilon on the uncorrected :math:`\sqrt{v}`, in place (`step` counts from 1):

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    W <- (1 - lr wd) W - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
    """
    grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    denom = exp_avg_sq.sqrt().add_(eps)
    if weight_decay != 0.0:
        weight.mul_(1.0 - lr * weight_decay)
    weight.addcdiv_(exp_avg, denom, value=-step_size)


# ------------------------------------------------------------------------------------- the optimizer


class SCALE(BaseOptimizer):
    r"""SCALE (arXiv 2506.16659): column-normalised SGD, momentum on the last layer only, AdamW for the norms.

    Each param group has a ``rule``:

    - ``"column_norm"`` (attention/MLP weights, the input embedding): no state;
      :math:`W \leftarrow (1-\eta\lambda)W - \eta\, N(G)`.
    - ``"momentum_column_norm"`` (``lm_head``): :math:`M \leftarrow \mu M + (1-\mu) G` (``momentum`` = μ,
      default 0.9, no bias correction), :math:`W \leftarrow (1-\eta\lambda)W - \eta\, N(M)`.
    - ``"adamw"`` (RMSNorm weights, every 1-D parameter): with t counted from 1,
      :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
      :math:`W \leftarrow (1-\eta\lambda)W - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
      \frac{m}{\sqrt{v}+\epsilon}` (ε added to the *uncorrected* √v, i.e. before the bias correction;
      betas (0.9, 0.999), ε 1e-8). Its group lr is SCALE's ``adam_lr``: a schedule that scales every
      group's lr by the same multiplier gives :math:`\eta'_t = \text{adam\_lr}\cdot\eta_t/\eta_{max}`.

    N(X) for a 2-D X divides each slice along ``norm_dim`` by :math:`\max(\nu, 10^{-8})`:
    ``norm_dim=1`` (a Linear weight, out x in): each row by the norm over its inputs; ``norm_dim=0`` (the
    embedding, V x d): each of the d feature columns by its norm over all V rows (rows of tokens absent
    from the batch have zero gradient and still count in the rms). ``norm="rms"`` (default):
    :math:`\nu = \text{rms} = \|x\|_2/\sqrt{K}` (K entries in the slice), the published *code's*
    semantics, with which the published lr 1e-3 works; ``norm="l2"``: :math:`\nu = \|x\|_2`, the paper's
    text (its update is √K times smaller, so the lr must be √K times larger).

    Decoupled weight decay multiplies W by (1 − ηλ) before the update in every rule (torch AdamW's order).

    State per m x n weight: column_norm 0; lm_head ``momentum_buffer`` m n numbers; an AdamW parameter of
    k numbers ``exp_avg``, ``exp_avg_sq`` (2k numbers) and ``step`` (a Python int). ``state_dtype``: None
    follows the parameter's dtype, "float32" keeps the states of bfloat16 weights in float32.

    Every hyper-parameter lives in the group (``rule``, ``norm_dim``, ``norm``, ``momentum``, ``lr``,
    ``weight_decay``, ``betas``, ``eps``, ``state_dtype``), so ``SCALE([dict(group, params=[p])])``
    updates p exactly as the joint optimizer does. Row-sharded (FSDP2 ``Shard(0)``) DTensor parameters
    get the update of the whole matrix: rows and elementwise states are local, a norm over rows (the
    embedding) sums its squares over the ranks. int8 weights (`quant.QuantLinear`) are updated through
    their float32 copy and re-quantised. Differences from the published code: the rule is chosen per
    group (not by parameter names), weight decay (0 in the published runs) is applied in every group.
    """

    group_label = "SCALE"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        rule: str = "column_norm",
        norm_dim: int = 1,
        norm: str = "rms",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state_dtype: torch.dtype | str | None = None,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, rule=rule, norm_dim=norm_dim, norm=norm,
                        momentum=momentum, betas=tuple(betas), eps=eps, state_dtype=state_dtype)
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups
    def _check_group(self, group: dict[str, Any], name: str) -> None:
        check_hyperparameters(group, name)
        group["betas"] = tuple(group["betas"])
        if group["rule"] not in RULES:
            raise ValueError(f"{name}: rule must be one of {RULES}, got {group['rule']!r}")
        group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        if isinstance(group["norm_dim"], bool) or group["norm_dim"] not in (0, 1):
            raise ValueError(f"{name}: norm_dim must be 0 (per column, over rows) or 1 (per row, over columns), "
                             f"got {group['norm_dim']!r}")
        if group["norm"] not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, got {group['norm']!r}")
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1), got {group['momentum']!r}")
        if group["rule"] == "adamw":
            return
        for position, param in enumerate(group["params"]):
            if param.dim() != 2:
                raise ValueError(f"{name}: rule {group['rule']!r} takes 2-D weights only; parameter {position} has "
                                 f"shape {tuple(param.shape)} (put it in a rule='adamw' group)")

    # ----------------------------------------------------------------- state
    def _zeros(self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Zero state shaped and laid out like `param` (Shard(0) DTensor for a sharded one), in the state dtype."""
        dtype = STATE_DTYPES[group["state_dtype"]] or grad.dtype
        return sharded.zeros_like_layout(param, tuple(param.shape), rows_sharded=True, dtype=dtype,
                                         device=sharded.local(grad).device)

    # ------------------------------------------------------------------ step
    def _step_parameters(self) -> None:
        for group in self.param_groups:
            rule = group["rule"]
            for param in group["params"]:
                grad = self._gradient(param)  # .grad, or float_grad of an int8 weight
                if grad is None:
                    continue
                shard = sharded.row_shard(param)
                local_grad = sharded.local(grad)
                with quant.float_weight(param) as weight:  # the float32 copy of an int8 weight is re-quantised
                    weight = sharded.local(weight)
                    if rule == "column_norm":
                        column_norm_update(weight, local_grad, lr=group["lr"], weight_decay=group["weight_decay"],
                                           norm_dim=group["norm_dim"], norm=group["norm"], shard=shard)
                        continue
                    state = self.state[param]
                    if rule == "momentum_column_norm":
                        if not state:
                            state["momentum_buffer"] = self._zeros(group, param, grad)
                        momentum_column_norm_update(weight, local_grad, sharded.local(state["momentum_buffer"]),
                                                    lr=group["lr"], weight_decay=group["weight_decay"],
                                                    momentum=group["momentum"], norm_dim=group["norm_dim"],
                                                    norm=group["norm"], shard=shard)
                        continue
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = self._zeros(group, param, grad)
                        state["exp_avg_sq"] = self._zeros(group, param, grad)
                    state["step"] += 1
                    beta1, beta2 = group["betas"]
                    adamw_update(weight, local_grad, sharded.local(state["exp_avg"]),
                                 sharded.local(state["exp_avg_sq"]), step=state["step"], lr=group["lr"],
                                 beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


# ------------------------------------------------------------------------------------------ routing

#: Options `build` accepts, with their defaults (adam_lr: the published 60M-350M setting).
DEFAULTS: dict[str, Any] = {"adam_lr": 0.02, "momentum": 0.9, "norm": "rms", "betas": (0.9, 0.999), "eps": 1e-8,
                            "state_dtype": None}
OPTIONS: frozenset[str] = frozenset(DEFAULTS)


def _module_or_none(model: nn.Module, getter: str) -> nn.Module | None:
    try:
        return getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None


def _tied(model: nn.Module, embedding: nn.Module | None, head: nn.Module | None) -> bool:
    if embedding is None or head is None:
        return False
    if head.weight is embedding.weight:
        return True
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return bool(getattr(config, "tie_word_embeddings", False))


def param_groups(model: nn.Module, lr: float, *, adam_lr: float, momentum: float, norm: str) -> list[dict[str, Any]]:
    """SCALE's routing of `model`'s trainable parameters, decided here only (by module type and config):

    - ``embedding``: the input embedding's weight (``model.get_input_embeddings()``) and any other
      ``nn.Embedding`` weight: column rule (``norm_dim=0``), no state;
    - ``lm_head``: the output head's weight (``model.get_output_embeddings()``): momentum, row rule;
      with tied embeddings (the same tensor, or ``config.tie_word_embeddings``) it gets no momentum: the
      shared tensor is in ``embedding``, a separate head weight of a tied config in ``hidden``;
    - ``hidden``: every other 2-D ``nn.Linear`` / int8 ``QuantLinear`` weight: row rule (``norm_dim=1``), no state;
    - ``adamw`` (lr ``adam_lr``): 1-D parameters (norms, biases) and anything else.
    Empty groups are left out. Every trainable parameter is in exactly one group; the counts are logged.
    """
    embedding = _module_or_none(model, "get_input_embeddings")
    head = _module_or_none(model, "get_output_embeddings")
    tied = _tied(model, embedding, head)
    routes: dict[str, list[torch.Tensor]] = {"embedding": [], "lm_head": [], "hidden": [], "adamw": []}
    seen: set[int] = set()

    def place(route: str, param: torch.Tensor | None) -> None:
        if param is not None and trainable(param) and id(param) not in seen:
            seen.add(id(param))
            routes[route].append(param)

    if embedding is not None and getattr(embedding, "weight", None) is not None and embedding.weight.dim() == 2:
        place("embedding", embedding.weight)
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        place("hidden" if tied else "lm_head", head.weight)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if isinstance(module, nn.Embedding):
                place("embedding", weight)
            elif isinstance(module, (nn.Linear, quant.QuantLinear)):
                place("hidden", weight)
    for param in model.parameters():
        place("adamw", param)
    settings = {
        "embedding": {"rule": "column_norm", "norm_dim": 0, "lr": lr},
        "lm_head": {"rule": "momentum_column_norm", "norm_dim": 1, "lr": lr, "momentum": momentum},
        "hidden": {"rule": "column_norm", "norm_dim": 1, "lr": lr},
        "adamw": {"rule": "adamw", "lr": adam_lr},
    }
    groups = [{"params": params, "name": route, "norm": norm, **settings[route]}
              for route, params in routes.items() if params]
    check_coverage(model, groups, f"SCALE param_groups (tied embeddings: {tied})", log=logger)
    return groups


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> SCALE:
    """SCALE over `model` (routing: `param_groups`). Options (None = default): adam_lr 0.02 (peak lr of the
    AdamW part), momentum 0.9 (lm_head), norm "rms" (the code's N; "l2" the paper's), betas (0.9, 0.999) and
    eps 1e-8 (the AdamW part), state_dtype None (follow the parameter; "float32" for bfloat16 weights)."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'scale' does not take option(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(OPTIONS))}")
    settings = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if not settings["adam_lr"] >= 0.0:
        raise ValueError(f"SCALE: adam_lr must be >= 0, got {settings['adam_lr']!r}")
    groups = param_groups(model, lr, adam_lr=settings["adam_lr"], momentum=settings["momentum"], norm=settings["norm"])
    return SCALE(groups, lr=lr, weight_decay=weight_decay, momentum=settings["momentum"], norm=settings["norm"],
                 betas=tuple(settings["betas"]), eps=settings["eps"], state_dtype=settings["state_dtype"])


#: Shared with the other hybrids that give some parameters to AdamW (Muon lists it too).
ADAM_LR = Flag("adam_lr", float, "peak lr of the AdamW part of a hybrid optimizer", "adam_lr", above=0.0)
SCALE_MOMENTUM = Flag("scale_momentum", float, "SCALE: momentum of the lm_head (default 0.9)", "momentum",
                      low=0.0, below=1.0)
SCALE_NORM = Flag("scale_norm", str, "SCALE: normalise rows/columns by their rms (default, the published code) or "
                                     "by their L2 norm (the paper's text)", "norm", choices=NORMS)


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """One weight's state after a step (s bytes a state number, n numbers): column_norm none, lm_head's momentum
    s n, an AdamW parameter Adam's step (8) + two moments, 8 + 2 s n."""
    s, n = state_element_size(group, param), param.numel()
    return {"column_norm": 0, "momentum_column_norm": s * n, "adamw": NUMBER_BYTES + 2 * s * n}[group["rule"]]


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"lr": 0.001, "adam_lr": 0.02, "scale_momentum": 0.9, "scale_norm": "rms", "num_training_steps": 11000},
    "130m": {"lr": 0.001, "adam_lr": 0.02, "scale_momentum": 0.9, "scale_norm": "rms"},
    "350m": {"lr": 0.001, "adam_lr": 0.02, "scale_momentum": 0.9, "scale_norm": "rms"},
    "1b": {"lr": 0.0002, "adam_lr": 0.001, "scale_momentum": 0.9, "scale_norm": "rms"},
    "7b": {"lr": 0.0001, "adam_lr": 0.001, "scale_momentum": 0.9, "scale_norm": "rms"},
}
SPEC = OptimizerSpec(
    "scale", build, OPTIONS, "SCALE: column-normalised SGD, lm_head momentum, AdamW for the norms (no state per matrix)",
    aliases=("scale_sgd",), from_groups=SCALE, state_bytes=param_state_bytes, scratch_bytes=scratch.scale,
    cli_flags=(ADAM_LR, SCALE_MOMENTUM, SCALE_NORM), default_eps=1e-8,
    flag_help={"adam_lr": "the norms, default 0.02 (published 60M-350M; 1e-3 at 1B/7B)"},
    smoke_options={"adam_lr": 1e-2}, smoke_flags={"lr": 0.003, "adam_lr": 0.01},
    published={SCALE_RUNS_60M: 30.81},
    recipes=RECIPES,
)
