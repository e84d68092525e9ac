"""The one registry: optimizer name -> builder, the options it takes, and a one-line summary.

`build_optimizer(name, model, lr, weight_decay, **options)` is the one door the training harness
(and `apollo.hf`) goes through. Each entry's builder decides the routing of every parameter in one
place (and logs the counts); an option the named optimizer does not take is a ValueError, so that a
flag is never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from . import adam_mini, adamw8bit, factory, fira, muon, scale, soap


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one named optimizer, which options it takes, and what it is (for --help and the README)."""

    build: Callable[..., torch.optim.Optimizer]  # (model, lr, weight_decay, **options) -> optimizer
    options: frozenset[str]
    summary: str


REGISTRY: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(factory.build_adamw, factory.ADAMW_OPTIONS,
                            "torch.optim.AdamW over every parameter (fused kernel on CUDA)"),
    "apollo": OptimizerEntry(partial(factory.build_low_rank, "apollo"), factory.LOWRANK_OPTIONS["apollo"],
                             "APOLLO: random rank-r projection, channel-wise scaling of the raw gradient"),
    "apollo_mini": OptimizerEntry(partial(factory.build_low_rank, "apollo_mini"), factory.LOWRANK_OPTIONS["apollo"],
                                  "APOLLO-Mini: rank 1, tensor-wise scaling, scale 128"),
    "apollo_svd": OptimizerEntry(partial(factory.build_low_rank, "apollo_svd"), factory.LOWRANK_OPTIONS["apollo"],
                                 "APOLLO with GaLore's SVD projection"),
    "galore": OptimizerEntry(partial(factory.build_low_rank, "galore"), factory.LOWRANK_OPTIONS["galore"],
                             "GaLore: Adam in an SVD subspace, projected back"),
    "fira": OptimizerEntry(fira.build, fira.OPTIONS,
                           "Fira: GaLore + the norm-scaled residual outside the subspace, limiter on the residual"),
    "scale": OptimizerEntry(scale.build, scale.OPTIONS,
                            "SCALE: column-normalised SGD, lm_head momentum, AdamW for the norms (no state per matrix)"),
    "muon": OptimizerEntry(muon.build, muon.OPTIONS,
                           "torch.optim.Muon on the decoder matrices + torch.optim.AdamW on embeddings, lm_head, norms"),
    "adam_mini": OptimizerEntry(adam_mini.build, adam_mini.OPTIONS,
                                "Adam-mini: one second moment per block (head, row, token, tensor)"),
    "soap": OptimizerEntry(soap.build, soap.OPTIONS, "SOAP: Adam in the eigenbasis of Shampoo's preconditioners"),
    "adamw8bit": OptimizerEntry(adamw8bit.build, adamw8bit.OPTIONS,
                                "bitsandbytes' 8-bit AdamW (optional dependency: pip install -e .[bnb])"),
}
ALIASES = {"apollo_adamw": "apollo", "galore_adamw": "galore", "fira_adamw": "fira", "scale_sgd": "scale"}


def register(name: str, entry: OptimizerEntry, *aliases: str) -> None:
    """Add an optimizer (and its aliases) to the registry."""
    REGISTRY[name] = entry
    ALIASES.update({alias: name for alias in aliases})


def optimizer_names() -> tuple[str, ...]:
    """Every canonical name, in registration order."""
    return tuple(REGISTRY)


def canonical_name(name: str) -> str:
    """'apollo_adamw' -> 'apollo', 'galore_adamw' -> 'galore'; ValueError for an unknown name."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        known = ", ".join(tuple(REGISTRY) + tuple(ALIASES))
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {known}")
    return key


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    **options: Any) -> torch.optim.Optimizer:
    """Build the named optimizer over `model`'s parameters.

    name: any key of `REGISTRY` or `ALIASES` (`optimizer_names()` lists them). options: those of the
    entry (`REGISTRY[name].options`); None means "the optimizer's default". Raises ValueError for an
    unknown name or an option the optimizer does not take.
    """
    key = canonical_name(name)
    entry = REGISTRY[key]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - entry.options)
    if unknown:
        raise ValueError(f"optimizer {key!r} does not take option(s) {', '.join(unknown)}")
    return entry.build(model, lr, weight_decay, **options)
