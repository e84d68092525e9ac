"""APOLLO optimizer family for memory-efficient LLM training; needs torch only.

    import apollo
    optimizer = apollo.build_optimizer("apollo_mini", model, lr=0.01)   # or "apollo", "apollo_svd", "galore", "adamw"

or, with explicit groups: `apollo.APOLLO(apollo.param_groups(model, rank=128), lr=0.01)`.
int8 weights: `apollo.quantize_model(model)` before building the optimizer; per-parameter updates
during backward: `apollo.LayerwiseOptimizer(model, "apollo_mini", lr=0.01)`.
"""
from .factory import PRESETS, optimizer_state_bytes, param_groups
from .registry import (ALIASES, BASELINE, REGISTRY, OptimizerEntry, build_optimizer, canonical_name, get_spec,
                       optimizer_names, register)
from .spec import OptimizerSpec
from .layerwise import LayerwiseOptimizer, check_layerwise
from .optimizer import APOLLO, GaLore
from .quant import QuantLinear, all_reduce_quantized_grads, quantize_model

__all__ = [
    "APOLLO",
    "GaLore",
    "LayerwiseOptimizer",
    "QuantLinear",
    "ALIASES",
    "BASELINE",
    "OptimizerEntry",
    "OptimizerSpec",
    "REGISTRY",
    "PRESETS",
    "all_reduce_quantized_grads",
    "build_optimizer",
    "canonical_name",
    "get_spec",
    "check_layerwise",
    "optimizer_names",
    "optimizer_state_bytes",
    "param_groups",
    "quantize_model",
    "register",
]


def __getattr__(name: str):
    """Deprecated public names, kept working: `apollo.OPTIMIZER_NAMES` (now `apollo.optimizer_names()`)."""
    if name == "OPTIMIZER_NAMES":
        import warnings

        warnings.warn("apollo.OPTIMIZER_NAMES is deprecated: use apollo.optimizer_names()", DeprecationWarning,
                      stacklevel=2)
        return optimizer_names()
    raise AttributeError(f"module 'apollo' has no attribute {name!r}")
