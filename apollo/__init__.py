"""APOLLO optimizer family for memory-efficient LLM training; needs torch only.

    import apollo
    optimizer = apollo.build_optimizer("apollo_mini", model, lr=0.01)   # or "apollo", "apollo_svd", "galore", "adamw"

or, with explicit groups: `apollo.APOLLO(apollo.param_groups(model, rank=128), lr=0.01)`.
"""
from .factory import (
    ALIASES,
    OPTIMIZER_NAMES,
    PRESETS,
    build_optimizer,
    canonical_name,
    optimizer_state_bytes,
    param_groups,
)
from .optimizer import APOLLO, GaLore

__all__ = [
    "APOLLO",
    "GaLore",
    "ALIASES",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "build_optimizer",
    "canonical_name",
    "optimizer_state_bytes",
    "param_groups",
]
