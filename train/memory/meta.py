"""The model and its optimizer on the meta device (shapes only), as the training loop builds them.

The model is built exactly as train/loop.py builds it, quantised with `apollo.quant.quantize_model` when
asked, and the real optimizer (any name of `apollo.optimizer_names()`) takes one step on it: the
optimizer-state count comes from the optimizer's own state tensors and cannot drift from the code.
Also the units every part of `train.memory` shares.
"""
from __future__ import annotations

import torch
from torch import nn

import apollo
from apollo.layerwise import LayerwiseOptimizer
from apollo.quant import is_quantized, quantize_model
from train.optimizer_flags import PARAM_DTYPE_STATES

GB = 1e9  # decimal gigabytes; a "12 GB" claim is checked against 12e9 bytes (GiB would be more lenient)
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: the optimizers that take a projection rank (`--rank`): a view of the registry's options
LOW_RANK = tuple(name for name in apollo.optimizer_names() if "rank" in apollo.registry.REGISTRY[name].options)


def build(config, *, dtype: str, device: str, weight_quant: bool, weight_group_size: int, weight_bits: int = 8,
          stochastic_round: bool = False, activation_checkpointing: bool = False, adapter=None) -> nn.Module:
    """The model as train/loop.py builds it (meta device: shapes only), int8-quantised on request; `adapter` (a
    TrainConfig or train.adapters.AdapterChoice): LoRA / Low-Rank factors, frozen W0 in the model dtype."""
    from train.adapters import apply_adapter
    from train.model import build_model

    model = build_model(config, dtype=dtype, device=device, activation_checkpointing=activation_checkpointing)
    if adapter is not None:
        apply_adapter(model, adapter)
    if weight_quant:
        quantize_model(model, group_size=weight_group_size, bits=weight_bits, stochastic_round=stochastic_round)
    return model


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_bytes(param: torch.Tensor, p: int) -> int:
    return param.numel() * p if is_quantized(param) else _bytes(param)


def resolve_state_dtype(name: str, state_dtype: str | None) -> str:
    """"param" or "float32": None picks the harness default (float32, except for the optimizers whose
    states always follow the weights: `train.optimizer_flags.PARAM_DTYPE_STATES`)."""
    if name in PARAM_DTYPE_STATES:
        return "param"
    return "float32" if state_dtype is None else state_dtype


def build_options(name: str, *, rank: int | None = None, state_dtype: str | None = None,
                  options: dict | None = None) -> dict:
    """The `apollo.build_optimizer` options for `name`: only those it takes (`REGISTRY[name].options`)."""
    accepted = apollo.registry.REGISTRY[name].options
    chosen = {key: value for key, value in (options or {}).items() if key != "state_dtype" and value is not None}
    unknown = sorted(set(chosen) - accepted)
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take option(s) {', '.join(unknown)}")
    if rank is not None:
        if "rank" not in accepted:
            raise ValueError(f"--rank does not apply to --optimizer {name} (it is used by {', '.join(LOW_RANK)})")
        chosen["rank"] = rank
    if "state_dtype" in accepted and name not in PARAM_DTYPE_STATES and state_dtype == "float32":
        chosen["state_dtype"] = "float32"
    return chosen


def optimizer_for(model: nn.Module, name: str, *, rank: int | None = None, state_dtype: str | None = None,
                  layerwise: bool = False, lr: float = 1e-3, options: dict | None = None):
    """The optimizer train/loop.py would build (state_dtype "param" means: follow the weights)."""
    name = apollo.canonical_name(name)
    kwargs = build_options(name, rank=rank, state_dtype=state_dtype, options=options)
    if layerwise:
        return LayerwiseOptimizer(model, name, lr=lr, **kwargs)
    return apollo.build_optimizer(name, model, lr=lr, **kwargs)


def step_on_meta(model: nn.Module, name: str, *, rank: int | None, state_dtype: str | None, p_dtype,
                 options: dict | None = None):
    """Run the real optimizer's first step on the meta device; returns the optimizer, its state created.

    8-bit AdamW needs bitsandbytes (its meta kernels create the real state shapes): ValueError without it.
    """
    try:
        optimizer = optimizer_for(model, name, rank=rank, state_dtype=state_dtype, options=options)
    except ImportError as error:
        raise ValueError(f"--optimizer {name}: {error}") from None
    for param in model.parameters():
        if is_quantized(param):
            param.float_grad = torch.empty(param.shape, dtype=p_dtype, device=param.device)
        elif param.requires_grad:
            param.grad = torch.empty_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer
