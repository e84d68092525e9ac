"""`OptimizerSpec`: every fact about one optimizer, declared next to it (its module's ``SPEC`` / ``SPECS``).

`apollo.registry` collects the specs; the training harness derives from them which flag reaches which
option, the default betas, whether states follow the weights' dtype and which modes are refused (with
the one-line reason), so that none of those tables names an optimizer. torch's ``optim_db`` /
``OptimizerInfo`` is the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

#: The memory/parallel modes a spec can refuse (TrainConfig fields of the same name).
MODES = ("weight_quant", "layerwise", "fsdp")
STANDARD_BETAS = (0.9, 0.999)


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how to build it and what it takes, supports and refuses.

    name: the canonical ``--optimizer`` / `apollo.build_optimizer` name; aliases: other accepted names.
    build: ``(model, lr, weight_decay, **options) -> torch.optim.Optimizer`` (its routing lives there).
    options: the option keys ``build`` accepts (anything else is refused with one line).
    summary: one line for ``--help`` and the README.
    flags: training CLI flag (a TrainConfig field) -> the option key it sets; ``negated_flags``: flags that
    set their option to ``not value`` (``--muon_no_nesterov`` -> ``nesterov=False``).
    default_betas: what it uses when ``--beta1/--beta2`` are not given.
    states_follow_weights: its states always take the weights' dtype (no float32 states for bf16 weights).
    refuses: mode (one of `MODES`) -> why it cannot run in it.
    from_groups: the optimizer over explicit param groups, ``from_groups(groups, **kwargs)`` (its class, or a
    function that builds it as ``build`` does): how integrations that make their own groups construct it.
    scratch_bytes: its memory model, ``scratch_bytes(param, group, *, name, p, device)`` -> bytes of the
    temporaries one parameter's update allocates (apollo/scratch.py has the derivations); train.memory refuses
    an optimizer without one.
    smoke_lr, smoke_options: an lr and options that train a tiny LLaMA in a few updates and reach the
    optimizer's periodic work (a projection or basis refresh every 2 updates): what the contract tests
    (tests/apollo/test_contract.py) and the CLI smoke runs use. smoke_flags: the training CLI flags of the
    same settings (a flag name -> value), for the 4-update runs of tests/train/test_peers.py.
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    options: frozenset[str]
    summary: str
    aliases: tuple[str, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)
    negated_flags: frozenset[str] = frozenset()
    default_betas: tuple[float, float] = STANDARD_BETAS
    states_follow_weights: bool = False
    refuses: Mapping[str, str] = field(default_factory=dict)
    from_groups: Callable[..., torch.optim.Optimizer] | None = None
    scratch_bytes: Callable[..., int] | None = None
    smoke_lr: float = 1e-2
    smoke_options: Mapping[str, Any] = field(default_factory=dict)
    smoke_flags: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.options))
        object.__setattr__(self, "flags", _frozen(self.flags))
        object.__setattr__(self, "refuses", _frozen(self.refuses))
        object.__setattr__(self, "smoke_options", _frozen(self.smoke_options))
        object.__setattr__(self, "smoke_flags", _frozen(self.smoke_flags))
        unknown_modes = sorted(set(self.refuses) - set(MODES))
        if unknown_modes:
            raise ValueError(f"OptimizerSpec {self.name!r}: unknown mode(s) {unknown_modes}; modes are {MODES}")
        unknown_options = sorted(set(self.flags.values()) - self.options)
        if unknown_options:
            raise ValueError(f"OptimizerSpec {self.name!r}: flags set option(s) {unknown_options} it does not take")
        unknown_smoke = sorted(set(self.smoke_options) - self.options)
        if unknown_smoke:
            raise ValueError(f"OptimizerSpec {self.name!r}: smoke_options {unknown_smoke} are not among its options")
        if not set(self.negated_flags) <= set(self.flags):
            raise ValueError(f"OptimizerSpec {self.name!r}: negated flags must be among its flags")

    @property
    def takes_eps(self) -> bool:
        return "eps" in self.options

    @property
    def takes_betas(self) -> bool:
        return "betas" in self.options

    def flag_value(self, flag: str, value: Any) -> Any:
        """The option value a CLI flag's value means for this optimizer."""
        return (not value) if flag in self.negated_flags else value
