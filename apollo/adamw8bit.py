r"""8-bit AdamW: bitsandbytes' blockwise-quantised AdamW (``bitsandbytes.optim.AdamW8bit``), routed for the harness.

bitsandbytes is optional (``pip install -e .[bnb]``) and imported only inside `build` / `optimizer_class`.
What it computes, read from bitsandbytes 0.50.2 (its CPU kernels, ``bitsandbytes/backends/cpu/ops.py``;
the CUDA kernels implement the same update):

- a tensor of at least ``min_8bit_size`` (4096) numbers keeps m and v as uint8 codes, ``state1``/``state2``,
  into two 256-entry code books (``qmap1``: signed dynamic map for m, ``qmap2``: unsigned for v) with one
  float32 absmax per block of 256 consecutive numbers (``absmax1``/``absmax2``, ceil(N/256) each). Each
  step dequantises (code value x block absmax), runs the float32 AdamW below, and re-quantises to the
  nearest code of x / absmax of the new block maximum;
- a smaller tensor (norm weights, biases) keeps float32 m, v (``state1``/``state2``), whatever the
  parameter's dtype;
- the update, in float32 (t = ``state["step"]``, counted from 1):
  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  W <- (1 - lr wd) W;
  W <- W - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  i.e. torch.optim.AdamW's form (eps on the *bias-corrected* sqrt(v), decay before the step), not this
  repository's APOLLO/AdamW convention (eps on the uncorrected sqrt(v), decay after).

State bytes per tensor of N numbers, as `apollo.optimizer_state_bytes` counts ``opt.state``:
N >= min_8bit_size: 2N (codes) + 8 ceil(N/256) (absmax) + 2048 (qmap1 and qmap2, 256 float32 each;
one shared pair per optimizer in memory, but listed in every tensor's state) + 8 (step);
N < min_8bit_size: 8N + 8. An m x n matrix: about 2mn bytes, a quarter of float32 AdamW's 8mn.

Harness modes: float32 and bf16 weights on CPU and GPU (bitsandbytes 0.50 has CPU kernels); the meta
device (bitsandbytes registers shape-only "fake" kernels, so stepping on meta creates the real state
shapes: `train.memory` can step it like the others); layer-wise rebuilds (every setting, ``min_8bit_size``
included, lives in the param group); ``torch.load(weights_only=True)`` of the state dict (bitsandbytes
nests the quantisation tensors under one key, tensors and ints only). Refused: sharded DTensor weights
(``--fsdp``) and int8 weights (``--weight_quant``).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from . import scratch
from .spec import OptimizerSpec
from . import quant, sharded
from .base import CheckedGroups, check_hyperparameters
from .routing import check_coverage, trainable

logger = logging.getLogger(__name__)

#: The option keys `build` accepts (each has a default).
OPTIONS = frozenset({"betas", "eps", "min_8bit_size", "state_dtype"})
INSTALL_HINT = "adamw8bit needs bitsandbytes: pip install -e .[bnb]"
BLOCK_SIZE = 256  # bitsandbytes' block for 8-bit optimizer states (fixed in 0.50: not an option)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return bitsandbytes


@functools.cache
def optimizer_class() -> type[torch.optim.Optimizer]:
    """``AdamW8bit``: bitsandbytes' AdamW8bit with its settings in the param groups and the harness's refusals.

    Made on first use (bitsandbytes is imported here) and cached, so that ``type(opt)`` is one class.
    """
    bnb = _bitsandbytes()

    class AdamW8bit(CheckedGroups, bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit (see `apollo.adamw8bit`'s docstring for the math and the state).

        Differences from ``bnb.optim.AdamW8bit``: ``weight_decay`` defaults to 0.0 (bitsandbytes: 0.01);
        ``min_8bit_size`` is a param-group key (bitsandbytes keeps it on the optimizer only), so that
        ``type(opt)([dict(group, params=[p])])`` rebuilds the same optimizer; every setting is checked
        with a one-line ValueError; DTensor and int8 weights are refused.
        """

        def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 0.0, min_8bit_size: int = 4096):
            self._min_8bit_size = min_8bit_size  # read by add_param_group, which torch calls from __init__
            _check_settings(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size),
                            "adamw8bit")
            super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             min_8bit_size=min_8bit_size)
            self.defaults["min_8bit_size"] = min_8bit_size

        group_label = "adamw8bit"

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            param_group.setdefault("min_8bit_size", self._min_8bit_size)
            super().add_param_group(param_group)  # checked by _check_group

        def _check_group(self, group: dict[str, Any], name: str) -> None:
            group["betas"] = tuple(group["betas"])
            _check_settings(group, name)
            for param in group["params"]:
                if sharded.is_dtensor(param):
                    raise ValueError("--fsdp is not supported for adamw8bit: bitsandbytes' blockwise 8-bit states "
                                     "do not shard as DTensors")
                if quant.is_quantized(param):
                    raise ValueError("adamw8bit cannot update int8 weights (--weight_quant): it quantises states, "
                                     "not weights")

        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            config["min_8bit_size"] = group.get("min_8bit_size", self._min_8bit_size)
            return config

    return AdamW8bit


def _check_settings(group: dict[str, Any], name: str) -> None:
    """One-line ValueErrors for bad settings (bitsandbytes' own checks say less)."""
    check_hyperparameters(group, name)
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{name}: min_8bit_size must be an integer >= 0, got {size!r}")


def state_bytes(numel: int, min_8bit_size: int = 4096) -> int:
    """What `apollo.optimizer_state_bytes` counts for one stepped tensor of `numel` numbers (no bitsandbytes needed).

    8-bit: 2 N + 8 ceil(N / 256) + 2 * 256 * 4 + 8; float32: 8 N + 8 (see the module docstring).
    """
    if numel < min_8bit_size:
        return 8 * numel + 8
    blocks = -(-numel // BLOCK_SIZE)
    return 2 * numel + 2 * 4 * blocks + 2 * 256 * 4 + 8


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """The spec's formula: `state_bytes` of `param` with its group's min_8bit_size (the weight's dtype plays no part)."""
    return state_bytes(param.numel(), group["min_8bit_size"])


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW over every trainable parameter of `model`, one group named "all".

    options (None means the default): betas (0.9, 0.999), eps 1e-8, min_8bit_size 4096 (tensors with fewer
    numbers keep float32 m, v: the norms), state_dtype (None or "float32" only: bitsandbytes' layout is fixed,
    uint8 codes + float32 absmax, float32 for small tensors). Raises ImportError without bitsandbytes.
    """
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'adamw8bit' does not take option(s) {', '.join(unknown)}")
    state_dtype = options.pop("state_dtype", None)
    if state_dtype not in (None, "float32", torch.float32):
        raise ValueError(f"adamw8bit keeps uint8 codes with float32 scales (float32 below min_8bit_size); "
                         f"state_dtype must be None or float32, got {state_dtype!r}")
    params = [p for p in model.parameters() if trainable(p)]
    size = options.get("min_8bit_size", 4096)
    eight_bit = [p for p in params if p.numel() >= size]
    groups = [{"params": params, "name": "all"}]
    check_coverage(model, groups, "adamw8bit param groups", log=logger)
    logger.info("adamw8bit: %d tensors with 8-bit states (%.2fM values), %d with float32 states "
                "(%.2fM values, fewer than min_8bit_size=%d numbers)", len(eight_bit),
                sum(p.numel() for p in eight_bit) / 1e6, len(params) - len(eight_bit),
                sum(p.numel() for p in params if p.numel() < size) / 1e6, size)
    return optimizer_class()(groups, lr=lr, weight_decay=weight_decay, **options)


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "7b": {"lr": 0.005},
}
SPEC = OptimizerSpec(
    "adamw8bit", build, OPTIONS, "bitsandbytes' 8-bit AdamW (optional dependency: pip install -e .[bnb])",
    default_eps=1e-8, states_follow_weights=True,  # bitsandbytes' 8-bit codes
    from_groups=lambda groups, **kwargs: optimizer_class()(groups, **kwargs),  # bitsandbytes imported on first use
    state_bytes=param_state_bytes, scratch_bytes=scratch.adamw8bit,
    refuses={"weight_quant": "8-bit AdamW quantises states, not weights; it cannot update int8 weights",
             "fsdp": "bitsandbytes' 8-bit states do not shard as DTensors"},
    smoke_lr=3e-3, smoke_flags={"lr": 0.003},
    requires=("bitsandbytes",),
    recipes=RECIPES,
)
