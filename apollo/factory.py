"""The APOLLO family's side of the registry: presets, parameter groups, builders, state accounting.

`param_groups` is the one function that decides which weights are low-rank (APOLLO, GaLore, Fira);
`build_low_rank` and `build_adamw` are the builders `apollo.registry` registers for them;
`optimizer_state_bytes` counts what any optimizer holds.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from torch import nn

from . import scratch
from .spec import ADAM_MINI_PAPER_67M, APOLLO_PAPER_60M, SCALE_RUNS_60M, Flag, OptimizerSpec
from .optimizer import APOLLO, GaLore, low_rank_state_bytes
from .projection import PROJ_TYPE, RANK, UPDATE_PROJ_GAP
from .quant import is_quantized
from .routing import DEFAULT_TARGETS, TargetSpec, check_coverage, target_weights, trainable
from .sharded import local
from .state_dtypes import NUMBER_BYTES

logger = logging.getLogger(__name__)

#: Low-rank settings of each named optimizer. rank=None means "a quarter of the model's hidden size".
PRESETS: dict[str, dict[str, Any]] = {
    "apollo": {"rank": None, "proj": "random", "scale_type": "channel", "scale": 1.0},
    "apollo_mini": {"rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0},
    "apollo_svd": {"rank": None, "proj": "svd", "scale_type": "channel", "scale": 1.0},
    "galore": {"rank": None, "scale": 0.25},
}

# Options each optimizer understands; anything else is a mistake worth an error.
_OPTIMIZER_KEYS = {"betas", "eps", "state_dtype", "store_projection", "fused", "elementwise"}
_LOWRANK_KEYS = {
    "apollo": {"rank", "update_proj_gap", "proj", "proj_type", "scale_type", "scale", "scale_front",
               "norm_growth_limiter", "norm_growth_gamma", "target_modules"},
    "galore": {"rank", "update_proj_gap", "proj_type", "scale", "target_modules"},
}


def param_groups(
    model: nn.Module, target_modules: TargetSpec = DEFAULT_TARGETS, **lowrank_options: Any
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into `[regular, low_rank]` param groups.

    Low-rank: the 2-D weights of the linear layers `routing.select_targets(model, target_modules)` chooses
    (default ``("attn", "mlp")``: module names containing "attn" or "mlp", LLaMA's q/k/v/o and gate/up/down
    projections; also "all-linear", a regex string matched against whole names, or a list of substrings or
    regexes; a spec that selects nothing is a ValueError). Everything else (embeddings, lm_head, norms,
    biases) is regular. `lowrank_options` (rank, scale, ...) go into the low-rank group. Every trainable
    parameter lands in exactly one group (checked, counts logged). An int8 weight counts as trainable.
    """
    low_rank = target_weights(model, target_modules)
    low_rank_ids = {id(p) for p in low_rank}
    regular = [p for p in model.parameters() if trainable(p) and id(p) not in low_rank_ids]
    groups = [
        {"params": regular, "name": "regular"},
        {"params": low_rank, "name": "low_rank", **lowrank_options},
    ]
    check_coverage(model, groups, "param_groups")
    return groups


def _default_rank(model: nn.Module) -> int:
    """The presets' rank: a quarter of the model's hidden size."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise ValueError("rank is required: the model has no config.hidden_size to take a quarter of")
    return max(1, hidden // 4)


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> torch.optim.Optimizer:
    """`torch.optim.AdamW` over all parameters, torch's defaults (eps 1e-8) unless betas/eps are given.

    On CUDA the fused kernel (torch's fastest AdamW there), elsewhere torch's own default path, so that
    every ratio to this baseline is against the best AdamW of the device.
    """
    if any(is_quantized(p) for p in model.parameters()):
        raise ValueError("torch.optim.AdamW cannot update int8 weights (--weight_quant); "
                         "choose apollo, apollo_mini, apollo_svd, galore or fira")
    kwargs = {k: v for k, v in options.items() if k in ("betas", "eps")}
    params = [p for p in model.parameters()]
    if params and all(p.device.type == "cuda" for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def adamw_from_groups(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """torch.optim.AdamW over explicit groups as `build_adamw` makes it: the fused kernel when every parameter is on CUDA."""
    params = [p for group in groups for p in group["params"]]
    if params and all(p.device.type == "cuda" for p in params):
        kwargs.setdefault("fused", True)
    return torch.optim.AdamW(groups, **kwargs)


ADAMW_OPTIONS = frozenset({"betas", "eps", "state_dtype"})
LOWRANK_OPTIONS = {key: frozenset(_OPTIMIZER_KEYS | keys) for key, keys in _LOWRANK_KEYS.items()}


def build_low_rank(preset: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                   **options: Any) -> torch.optim.Optimizer:
    """APOLLO (apollo, apollo_mini, apollo_svd) or GaLore (galore) with `preset`'s settings under `options`.

    options (None means "the preset's value"): betas, eps, state_dtype, store_projection, fused, elementwise
    ("foreach" or "compiled": how the fused step computes the low-rank moments), and
    rank, update_proj_gap, proj_type, scale, target_modules; APOLLO variants also proj, scale_type,
    scale_front, norm_growth_limiter, norm_growth_gamma. `scale` is APOLLO's c (update multiplied by
    sqrt(c)) or GaLore's `galore_scale`.
    """
    optimizer_kwargs = {k: options.pop(k) for k in list(options) if k in _OPTIMIZER_KEYS}
    lowrank = {**PRESETS[preset], **options}
    if lowrank["rank"] is None:
        lowrank["rank"] = _default_rank(model)
    groups = param_groups(model, lowrank.pop("target_modules", DEFAULT_TARGETS), **lowrank)
    optimizer_class = GaLore if preset == "galore" else APOLLO
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **optimizer_kwargs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds in `optimizer.state`: tensors at their storage size (a DTensor's local shard),
    Python ints/floats as 8 bytes.

    Works on anything with a torch-style ``state`` mapping (a `LayerwiseOptimizer` merges its own).
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value = local(value)  # a sharded (DTensor) state counts the shard this process holds
                total += value.numel() * value.element_size()
            elif isinstance(value, (int, float)):
                total += NUMBER_BYTES
    return total


def torch_adamw_state_bytes(param: torch.Tensor, group: dict) -> int:
    """torch.optim.AdamW's state of a weight of n numbers, p bytes each: ``step`` (a 0-d float32 tensor) and
    ``exp_avg``, ``exp_avg_sq`` in the weight's dtype: 4 + 2 p n."""
    return 4 + 2 * param.element_size() * param.numel()


PROJ = Flag("proj", str, "APOLLO projection (default: the preset's)", "proj", choices=("random", "svd"))
SCALE_TYPE = Flag("scale_type", str, "APOLLO scaling granularity (default: the preset's)", "scale_type",
                  choices=("channel", "tensor"))
APOLLO_SCALE = Flag("apollo_scale", float, "APOLLO scale c; the update is multiplied by sqrt(c) (default: the preset's, "
                                           "1 or Mini 128)", "scale", above=0.0)
SCALE_FRONT = Flag("scale_front", bool, "APOLLO: apply sqrt(scale) before the norm-growth limiter", "scale_front",
                   default=False)
GALORE_SCALE = Flag("galore_scale", float, "GaLore update scale (default 0.25)", "scale", above=0.0)

_APOLLO_FLAGS = (RANK, UPDATE_PROJ_GAP, PROJ, PROJ_TYPE, SCALE_TYPE, APOLLO_SCALE, SCALE_FRONT)

#: PROTOCOL.md's rank for APOLLO and GaLore by model size, and the projection settings every recipe shares.
_RECIPE_RANKS = {"60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}
_RECIPE_PROJECTION = {"proj": "random", "proj_type": "std", "update_proj_gap": 200, "lr": 0.01}
#: The published recipes' settings of the optimizers built here, by model size (PROTOCOL.md): their own flags
#: and lr (OptimizerSpec.recipes; scripts/benchmark_c4 carries them). APOLLO-Mini's 60M and 130M runs put the
#: scale before the limiter, and its 130M run uses scale 192.
RECIPES = {
    "adamw": {**{size: {"lr": 0.005} for size in _RECIPE_RANKS}, "7b": {"lr": 0.01}},
    "apollo": {size: {"rank": rank, "scale_type": "channel", "apollo_scale": 1, **_RECIPE_PROJECTION}
               for size, rank in _RECIPE_RANKS.items()},
    "apollo_mini": {size: {"rank": 1, "scale_type": "tensor", "apollo_scale": 192 if size == "130m" else 128,
                           **({"scale_front": True} if size in ("60m", "130m") else {}), **_RECIPE_PROJECTION}
                    for size in _RECIPE_RANKS},
    "galore": {size: {"rank": rank, "update_proj_gap": 200, "galore_scale": 0.25, "lr": 0.01}
               for size, rank in _RECIPE_RANKS.items()},
}

#: The specs of the optimizers this module builds (see apollo.spec).
_LOW_RANK = dict(default_eps=1e-6, state_bytes=low_rank_state_bytes, scratch_bytes=scratch.low_rank_family,
                 fused_low_rank=True, refresh_option="update_proj_gap",
                 smoke_options={"rank": 4, "update_proj_gap": 2}, smoke_flags={"rank": 4, "update_proj_gap": 2})
SPECS = (
    OptimizerSpec("adamw", build_adamw, ADAMW_OPTIONS, "torch.optim.AdamW over every parameter (fused kernel on CUDA)",
                  default_eps=1e-8, states_follow_weights=True,  # torch's AdamW keeps its moments in the weights' dtype
                  refuses={"weight_quant": "torch.optim.AdamW cannot update int8 weights"},
                  from_groups=adamw_from_groups, state_bytes=torch_adamw_state_bytes, scratch_bytes=scratch.adamw,
                  torch_adamw_groups=lambda group: True,
                  smoke_lr=3e-3, smoke_flags={"lr": 0.003},
                  recipes=RECIPES["adamw"],
                  published={APOLLO_PAPER_60M: 34.06, SCALE_RUNS_60M: 30.05, ADAM_MINI_PAPER_67M: 29.32}),
    OptimizerSpec("apollo", partial(build_low_rank, "apollo"), LOWRANK_OPTIONS["apollo"],
                  "APOLLO: random rank-r projection, channel-wise scaling of the raw gradient",
                  aliases=("apollo_adamw",), cli_flags=_APOLLO_FLAGS, from_groups=APOLLO,
                  recipes=RECIPES["apollo"],
                  published={APOLLO_PAPER_60M: 31.55, SCALE_RUNS_60M: 30.94}, **_LOW_RANK),
    OptimizerSpec("apollo_mini", partial(build_low_rank, "apollo_mini"), LOWRANK_OPTIONS["apollo"],
                  "APOLLO-Mini: rank 1, tensor-wise scaling, scale 128", cli_flags=_APOLLO_FLAGS,
                  flag_help={"rank": "default 1"}, from_groups=APOLLO,
                  recipes=RECIPES["apollo_mini"],
                  published={APOLLO_PAPER_60M: 31.93, SCALE_RUNS_60M: 31.85},
                  **{**_LOW_RANK, "smoke_options": {"update_proj_gap": 2}, "smoke_flags": {"update_proj_gap": 2}}),
    OptimizerSpec("apollo_svd", partial(build_low_rank, "apollo_svd"), LOWRANK_OPTIONS["apollo"],
                  "APOLLO with GaLore's SVD projection", cli_flags=_APOLLO_FLAGS, from_groups=APOLLO,
                  published={APOLLO_PAPER_60M: 31.26}, **_LOW_RANK),
    OptimizerSpec("galore", partial(build_low_rank, "galore"), LOWRANK_OPTIONS["galore"],
                  "GaLore: Adam in an SVD subspace, projected back", aliases=("galore_adamw",),
                  cli_flags=(RANK, UPDATE_PROJ_GAP, PROJ_TYPE, GALORE_SCALE), from_groups=GaLore,
                  recipes=RECIPES["galore"],
                  published={APOLLO_PAPER_60M: 34.88, SCALE_RUNS_60M: 34.58}, **_LOW_RANK),
)
