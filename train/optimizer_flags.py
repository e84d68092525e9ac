"""Which optimizer takes which flag, and which memory/parallel modes each optimizer supports.

`FLAG_OPTIONS` maps every optimizer-specific TrainConfig field to the `apollo.build_optimizer` option it
sets, per optimizer: a flag given to an optimizer that does not take it is refused with one line (a flag
is never silently ignored). `optimizer_options(config)` is what the trainer passes to the registry.
`MODES` says which optimizers can run under --weight_quant, --layerwise and --fsdp, and why not where
they cannot; `check_modes` turns that into one-line errors before anything is built.
"""
from __future__ import annotations

import dataclasses
from typing import Any

#: flag (TrainConfig field) -> {canonical optimizer name: build_optimizer option key}
_APOLLO_FAMILY = ("apollo", "apollo_mini", "apollo_svd")
_LOW_RANK = _APOLLO_FAMILY + ("galore", "fira")
FLAG_OPTIONS: dict[str, dict[str, str]] = {
    "rank": {name: "rank" for name in _LOW_RANK},
    "update_proj_gap": {name: "update_proj_gap" for name in _LOW_RANK},
    "proj_type": {name: "proj_type" for name in _LOW_RANK},
    "proj": {name: "proj" for name in _APOLLO_FAMILY},
    "scale_type": {name: "scale_type" for name in _APOLLO_FAMILY},
    "apollo_scale": {name: "scale" for name in _APOLLO_FAMILY},
    "scale_front": {name: "scale_front" for name in _APOLLO_FAMILY},
    "galore_scale": {"galore": "scale"},
    "fira_alpha": {"fira": "alpha"},
    "fira_paper_form": {"fira": "paper_form"},
    "adam_lr": {"scale": "adam_lr", "muon": "adam_lr"},
    "scale_momentum": {"scale": "momentum"},
    "scale_norm": {"scale": "norm"},
    "muon_momentum": {"muon": "momentum"},
    "muon_no_nesterov": {"muon": "nesterov"},  # the flag turns Nesterov off: the option is its negation
    "muon_adjust_lr": {"muon": "adjust_lr_fn"},
    "soap_precondition_frequency": {"soap": "precondition_frequency"},
    "soap_max_precond_dim": {"soap": "max_precond_dim"},
    "soap_shampoo_beta": {"soap": "shampoo_beta"},
}
_NEGATED = {"muon_no_nesterov"}

#: betas an optimizer uses when --beta1/--beta2 are not given (apollo.soap.SOAP's defaults; tested against them)
DEFAULT_BETAS: dict[str, tuple[float, float]] = {"soap": (0.95, 0.95)}
STANDARD_BETAS = (0.9, 0.999)

#: optimizers whose states always follow the weights' dtype (torch's AdamW and Muon, bitsandbytes' 8-bit codes)
PARAM_DTYPE_STATES = frozenset({"adamw", "muon", "adamw8bit"})

#: mode -> {optimizer: why it cannot run in that mode}; an optimizer absent from a mode's table supports it
MODES: dict[str, dict[str, str]] = {
    "weight_quant": {
        "adamw": "torch.optim.AdamW cannot update int8 weights",
        "muon": "Newton-Schulz on re-quantised int8 weights is not a published method",
        "soap": "SOAP has no int8 weight path",
        "adamw8bit": "8-bit AdamW quantises states, not weights; it cannot update int8 weights",
    },
    "layerwise": {},
    "fsdp": {
        "soap": "SOAP's preconditioners need whole matrices (no gathered update yet)",
        "adamw8bit": "bitsandbytes' 8-bit states do not shard as DTensors",
    },
}


def default_betas(optimizer: str) -> tuple[float, float]:
    """The (beta1, beta2) an optimizer uses when none are given."""
    return DEFAULT_BETAS.get(optimizer, STANDARD_BETAS)


def refused_flags(config: Any, defaults: dict[str, Any]) -> list[str]:
    """One line per optimizer flag set away from its default that `config.optimizer` does not take."""
    return [f"--{flag} does not apply to --optimizer {config.optimizer} (it is used by {', '.join(takers)})"
            for flag, takers in FLAG_OPTIONS.items()
            if getattr(config, flag) != defaults[flag] and config.optimizer not in takers]


def check_modes(config: Any) -> str | None:
    """The one-line reason `config.optimizer` cannot run in a mode the config asks for, or None."""
    for mode, refusals in MODES.items():
        if getattr(config, mode) and config.optimizer in refusals:
            return f"--{mode} does not work with --optimizer {config.optimizer}: {refusals[config.optimizer]}"
    return None


def optimizer_options(config: Any) -> dict[str, Any]:
    """Keyword options for apollo.build_optimizer: betas always, the rest only where the user set them."""
    defaults = {spec.name: spec.default for spec in dataclasses.fields(config)}
    options: dict[str, Any] = {"betas": (config.beta1, config.beta2), "eps": config.eps}
    if config.optimizer not in PARAM_DTYPE_STATES:
        options["state_dtype"] = "float32" if config.state_dtype == "float32" else None
    for flag, takers in FLAG_OPTIONS.items():
        value = getattr(config, flag)
        if config.optimizer in takers and value != defaults[flag]:
            options[takers[config.optimizer]] = (not value) if flag in _NEGATED else value
    return {key: value for key, value in options.items() if value is not None}
