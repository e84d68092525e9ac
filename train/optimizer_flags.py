"""Which optimizer takes which flag, and which memory/parallel modes each optimizer supports: views of the
optimizer specs (`apollo.spec.OptimizerSpec`, collected in `apollo.REGISTRY`); no optimizer is named here.

`declared_flags()` collects the `apollo.spec.Flag`s the specs declare: train/config.py generates one TrainConfig
field (and so one ``--flag``) from each, with its help, default, choices and domain, and a help line that says
which optimizers take it. `FLAG_OPTIONS` maps every optimizer-specific TrainConfig field to the
`apollo.build_optimizer` option it sets, per optimizer: a flag given to an optimizer that does not take it is refused with one line (a flag
is never silently ignored). `optimizer_options(config)` is what the trainer passes to the registry.
`MODES` says which optimizers cannot run under --weight_quant, --layerwise and --fsdp, and why;
`check_modes` turns that into one-line errors before anything is built. The tables are live: an
optimizer registered later (`apollo.register`) is in them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import apollo
from apollo.registry import RegistryView
from apollo.spec import MODES as MODE_NAMES, STANDARD_BETAS, Flag


def declared_flags() -> dict[str, Flag]:
    """Every optimizer flag of the registered specs, name -> its `Flag`, in registration order.

    A flag shared by several specs is one `Flag` (listed by each, or mapped by name in a spec's ``flags``);
    ValueError (one line) for two different declarations of one name, or a spec mapping a flag no spec declares.
    """
    declared: dict[str, Flag] = {}
    owner: dict[str, str] = {}
    for spec in apollo.REGISTRY.values():
        for flag in spec.cli_flags:
            if flag.name in declared and declared[flag.name] != flag:
                raise ValueError(f"optimizer flag --{flag.name} is declared twice, differently, by {owner[flag.name]!r} "
                                 f"and {spec.name!r}: declare it once and list that Flag in both specs")
            declared.setdefault(flag.name, flag)
            owner.setdefault(flag.name, spec.name)
    for spec in apollo.REGISTRY.values():
        undeclared = sorted(set(spec.flags) - set(declared))
        if undeclared:
            raise ValueError(f"optimizer {spec.name!r} maps flag(s) {', '.join('--' + f for f in undeclared)} that no "
                             f"spec declares: list an apollo.spec.Flag in some spec's cli_flags")
    return declared


def flag_help(flag: Flag) -> str:
    """A flag's --help: its own text, then the optimizers that take it (with their specs' notes on it)."""
    takers = [spec for spec in apollo.REGISTRY.values() if flag.name in spec.flags]
    plain = [spec.name for spec in takers if flag.name not in spec.flag_help]
    notes = [f"{spec.name}: {spec.flag_help[flag.name]}" for spec in takers if flag.name in spec.flag_help]
    return f"{flag.help} [--optimizer {'; '.join(filter(None, (', '.join(plain), *notes)))}]"


def _flag_options() -> dict[str, dict[str, str]]:
    table: dict[str, dict[str, str]] = {}
    for spec in apollo.REGISTRY.values():
        for flag, option in spec.flags.items():
            table.setdefault(flag, {})[spec.name] = option
    return table


#: flag (TrainConfig field) -> {canonical optimizer name: build_optimizer option key}
FLAG_OPTIONS: Mapping[str, dict[str, str]] = RegistryView(_flag_options)
#: betas an optimizer uses when --beta1/--beta2 are not given, where they differ from (0.9, 0.999)
DEFAULT_BETAS: Mapping[str, tuple[float, float]] = RegistryView(
    lambda: {s.name: s.default_betas for s in apollo.REGISTRY.values() if s.default_betas != STANDARD_BETAS})
#: optimizers whose states always follow the weights' dtype (`name in PARAM_DTYPE_STATES`)
PARAM_DTYPE_STATES: Mapping[str, bool] = RegistryView(
    lambda: {s.name: True for s in apollo.REGISTRY.values() if s.states_follow_weights})
#: mode -> {optimizer: why it cannot run in that mode}; an optimizer absent from a mode's table supports it
MODES: Mapping[str, dict[str, str]] = RegistryView(
    lambda: {mode: {s.name: s.refuses[mode] for s in apollo.REGISTRY.values() if mode in s.refuses}
             for mode in MODE_NAMES})


def default_betas(optimizer: str) -> tuple[float, float]:
    """The (beta1, beta2) an optimizer uses when none are given (its spec's)."""
    return apollo.get_spec(optimizer).default_betas


def refused_flags(config: Any, defaults: dict[str, Any]) -> list[str]:
    """One line per optimizer flag set away from its default that `config.optimizer` does not take."""
    return [f"--{flag} does not apply to --optimizer {config.optimizer} (it is used by {', '.join(takers)})"
            for flag, takers in FLAG_OPTIONS.items()
            if flag in defaults and getattr(config, flag) != defaults[flag] and config.optimizer not in takers]


def check_modes(config: Any) -> str | None:
    """The one-line reason `config.optimizer` cannot run in a mode the config asks for, or None."""
    for mode, refusals in MODES.items():
        if getattr(config, mode) and config.optimizer in refusals:
            return f"--{mode} does not work with --optimizer {config.optimizer}: {refusals[config.optimizer]}"
    if getattr(config, "compile_optimizer", False):
        if not apollo.get_spec(config.optimizer).fused_low_rank:
            fused = [name for name in apollo.optimizer_names() if apollo.get_spec(name).fused_low_rank]
            return (f"--compile_optimizer compiles the fused low-rank step of {', '.join(fused)}; "
                    f"--optimizer {config.optimizer} has none")
        if config.weight_quant:
            return "--compile_optimizer does not combine with --weight_quant: int8 weights take the plain step"
    return None


def optimizer_options(config: Any) -> dict[str, Any]:
    """Keyword options for apollo.build_optimizer: betas always, the rest only where the user set them."""
    defaults = {spec.name: spec.default for spec in dataclasses.fields(config)}
    options: dict[str, Any] = {"betas": (config.beta1, config.beta2), "eps": config.eps}
    if config.optimizer not in PARAM_DTYPE_STATES:
        options["state_dtype"] = "float32" if config.state_dtype == "float32" else None
    spec = apollo.get_spec(config.optimizer)
    for flag, option in spec.flags.items():
        if flag not in defaults:  # declared by a spec registered after TrainConfig was made: no such flag was given
            continue
        value = getattr(config, flag)
        if value != defaults[flag]:
            options[option] = spec.flag_value(flag, value)
    if getattr(config, "compile_optimizer", False):  # check_modes refused it for specs without the fused step
        options["elementwise"] = "compiled"
    return {key: value for key, value in options.items() if value is not None}
