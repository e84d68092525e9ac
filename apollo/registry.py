"""The one registry: optimizer name -> its `OptimizerSpec` (apollo/spec.py), declared in its own module.

`build_optimizer(name, model, lr, weight_decay, **options)` is the one door the training harness
(and `apollo.hf`) goes through. Each entry's builder decides the routing of every parameter in one
place (and logs the counts); an option the named optimizer does not take is a ValueError, so that a
flag is never silently ignored.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from . import adam_mini, adamw8bit, factory, fira, flora, galore8bit, muon, scale, soap
from .spec import OptimizerSpec


#: Every optimizer's spec, in registration order: the APOLLO family's module first, then one per peer.
SPECS: tuple[OptimizerSpec, ...] = (*factory.SPECS, fira.SPEC, scale.SPEC, muon.SPEC, adam_mini.SPEC, soap.SPEC,
                                    adamw8bit.SPEC, flora.SPEC, galore8bit.SPEC)
REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in SPECS}
#: The AdamW baseline: the optimizer every comparison (study speedups, the memory planner's first row) is measured
#: against, and the trainer's default. A stated choice of the harness, not a fact about an optimizer.
BASELINE = "adamw"
ALIASES: dict[str, str] = {alias: spec.name for spec in SPECS for alias in spec.aliases}


def OptimizerEntry(build, options, summary, **fields) -> OptimizerSpec:  # noqa: N802 (a deprecated class name)
    """Deprecated: the registry's entries before `OptimizerSpec`, ``OptimizerEntry(build, options, summary)``;
    returns a spec without a name, which ``register(name, entry)`` gives it."""
    return OptimizerSpec("", build, options, summary, **fields)


class RegistryView(Mapping):
    """A read-only mapping recomputed from the registry at each use (`compute()` builds it), so an optimizer
    registered later is in every table derived from the specs."""

    def __init__(self, compute: Callable[[], dict]):
        self._compute = compute

    def __getitem__(self, key):
        return self._compute()[key]

    def __iter__(self) -> Iterator:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return repr(self._compute())


def register(spec: OptimizerSpec | str, entry: OptimizerSpec | None = None, *aliases: str) -> None:
    """Add an optimizer to the registry: ``register(spec)`` (its name and aliases are the spec's), or the older
    ``register(name, entry, *aliases)``. Everything the harness derives from the registry then includes it."""
    if isinstance(spec, str):
        from dataclasses import replace
        spec = replace(entry, name=spec, aliases=tuple(entry.aliases) + aliases)
    REGISTRY[spec.name] = spec
    ALIASES.update({alias: spec.name for alias in spec.aliases})


def get_spec(name: str) -> OptimizerSpec:
    """The spec of an optimizer name or alias; ValueError (one line) for an unknown one."""
    return REGISTRY[canonical_name(name)]


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


def formula_state_bytes(name: str, model: nn.Module, **options: Any) -> int:
    """The optimizer state `name` holds over `model` after a step, by its spec's ``state_bytes`` formula: the
    optimizer is built (its groups, their settings), not stepped, so a meta-device model of any size costs nothing.
    ValueError for a spec that declares no formula."""
    spec = get_spec(name)
    if spec.state_bytes is None:
        raise ValueError(f"spec {spec.name!r} declares no state_bytes")
    optimizer = build_optimizer(name, model, lr=1e-3, **options)
    return sum(spec.state_bytes(param, group) for group in optimizer.param_groups for param in group["params"])
