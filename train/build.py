"""The model transform and the optimizer a run config asks for: shared by the loop, the preflight checks and the plan.

`quantize(model, config)` stores the attention/MLP weights as uint8 groups when --weight_quant is set
(apollo/quant.py); `build_optimizer(model, config)` builds the joint optimizer of apollo.build_optimizer,
or with --layerwise a `LayerwiseOptimizer` that updates each parameter from its gradient hook during
backward. Both work on the meta device, so preflight and --dry_run check exactly what training builds.
"""
from __future__ import annotations

import torch
from torch import nn

import apollo
from apollo.layerwise import LayerwiseOptimizer
from apollo.quant import quantize_model
from train.config import TrainConfig, optimizer_options


def quantize(model: nn.Module, config: TrainConfig) -> nn.Module:
    """int8 attention/MLP weights with --weight_quant (in place; layer seeds follow --seed); else `model` as is.

    Raises ValueError when --weight_group_size does not divide a weight.
    """
    if config.weight_quant:
        quantize_model(model, group_size=config.weight_group_size, bits=config.weight_bits,
                       stochastic_round=config.stochastic_round, seed=config.seed)
    return model


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | LayerwiseOptimizer:
    """The run's optimizer. Layer-wise: no lr_lambda, the loop sets every group's lr before each update as usual.
    --compile_optimizer: built with elementwise="compiled" (the fused step's low-rank moments compiled)."""
    if config.layerwise:
        return LayerwiseOptimizer(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                  **optimizer_options(config))
    return apollo.build_optimizer(config.optimizer, model, lr=config.lr, weight_decay=config.weight_decay,
                                  **optimizer_options(config))
