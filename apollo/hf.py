"""Hugging Face adapters: this project's optimizers inside `transformers.Trainer`, on any causal LM.

Three routes, one builder (`build`) underneath; each gives ``Trainer`` a factory, the form
transformers 5.x accepts where ``Trainer(optimizers=...)`` is refused (under FSDP)::

    from apollo import hf
    # 1. by name, with this project's option keys
    Trainer(model, args, optimizer_cls_and_kwargs=(hf.OptimizerFactory, {"name": "apollo_mini", "lr": 1e-2}))
    # 2. from TrainingArguments: optim="apollo_adamw" | "galore_adamw" | "adamw_torch", optim_args,
    #    optim_target_modules, learning_rate, weight_decay, adam_beta1/2, adam_epsilon
    Trainer(model, args, optimizer_cls_and_kwargs=hf.from_training_args(args))
    # 3. LLaMA-Factory's keys (use_apollo, apollo_rank, ... or use_galore, galore_rank, ...)
    Trainer(model, args, optimizer_cls_and_kwargs=hf.from_llamafactory({"use_apollo": True}, args))

transformers calls the first element with no arguments and the result with ``(model, **kwargs)``
(``trainer_optimizer.is_optimizer_factory``: anything that is not an Optimizer subclass).

Parameters, decided in `param_groups` (one function, counts logged): the low-rank group is the
weights `select_targets` picks, with transformers' rules for ``optim_target_modules``: a string
is a regex that must match a module's whole name (``re.fullmatch``), ``"all-linear"`` is every
linear layer except the output head; a list matches a module whose name equals an entry, contains
an entry, or fully matches an entry as a regex. Linear layers are ``nn.Linear``, GPT-2's ``Conv1D``
(a linear layer stored in x out: low-rank projection treats it as the matrix it stores, so
``proj_type`` ``left``/``right`` name the sides of that stored matrix) and int8 ``QuantLinear``.
A target spec that selects no weight is a ValueError. The rest is split like Trainer's AdamW:
1-D tensors (biases, norm weights) get no weight decay, every other tensor gets ``weight_decay``
(low-rank weights included). Groups are ``[regular, no_decay, low_rank]``, so the low-rank
weights keep the positions (hence the random-projection seeds) they have in
`apollo.build_optimizer`'s ``[regular, low_rank]``.

Differences from transformers' own handlers (which need the ``apollo-torch`` / ``galore-torch``
packages): ``weight_decay`` is applied; every ``optim_args`` key reaches the optimizer (an unknown
one is a ValueError, not silently dropped); ``"all-linear"`` leaves the output head out (theirs
projects lm_head too); the state dict loads with ``torch.load(weights_only=True)``, which is how
Trainer resumes. Layer-wise variants (``*_layerwise``, ``apollo_layerwise``) are refused.

transformers is imported inside the functions that need it: ``import apollo`` stays torch-only.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch
from torch import nn

from .factory import PRESETS, _default_rank
from .registry import REGISTRY
from . import routing
from .quant import is_quantized
from .routing import ALL_LINEAR, TargetSpec

logger = logging.getLogger(__name__)

#: The optimizers this module builds itself (low-rank, with any target spec) and their classes.
LOW_RANK = {name: spec.from_groups for name, spec in REGISTRY.items() if name in PRESETS}

#: TrainingArguments.optim -> (our name, the defaults transformers 5.24's own handler uses for it).
TRAINER_OPTIMS: dict[str, tuple[str, dict[str, Any]]] = {
    "apollo_adamw": ("apollo", {"rank": 128, "proj": "random", "scale_type": "channel", "update_proj_gap": 200,
                                "scale": 1.0, "proj_type": "std"}),
    "galore_adamw": ("galore", {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}),
    "adamw_torch": ("adamw", {}),
    "adamw_torch_fused": ("adamw", {}),
}

#: LLaMA-Factory's keys and defaults (src/llamafactory/hparams/finetuning_args.py, ApolloArguments and
#: GaloreArguments) -> our option names. "target" "all" means every linear layer but the output head.
LLAMAFACTORY_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "apollo": {"apollo_target": ("target_modules", "all"), "apollo_rank": ("rank", 16),
               "apollo_update_interval": ("update_proj_gap", 200), "apollo_scale": ("scale", 32.0),
               "apollo_proj": ("proj", "random"), "apollo_proj_type": ("proj_type", "std"),
               "apollo_scale_type": ("scale_type", "channel"), "apollo_scale_front": ("scale_front", False),
               "apollo_layerwise": ("layerwise", False)},
    "galore": {"galore_target": ("target_modules", "all"), "galore_rank": ("rank", 16),
               "galore_update_interval": ("update_proj_gap", 200), "galore_scale": ("scale", 2.0),
               "galore_proj_type": ("proj_type", "std"), "galore_layerwise": ("layerwise", False)},
}

# Types of the option values that arrive as text (optim_args "k=v,k=v"); other keys are read as literals.
_INT_KEYS = {"rank", "update_proj_gap"}
_FLOAT_KEYS = {"scale", "norm_growth_gamma"}
_BOOL_KEYS = {"scale_front", "norm_growth_limiter", "store_projection", "fused"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Settings that TrainingArguments carries itself: optim_args may not set them a second time.
_TRAINING_ARGS_FIELDS = {"lr": "learning_rate", "weight_decay": "weight_decay", "betas": "adam_beta1/adam_beta2",
                         "eps": "adam_epsilon", "target_modules": "optim_target_modules"}


# ------------------------------------------------------------------------------ target selection


def select_targets(model: nn.Module, target_modules: TargetSpec = ALL_LINEAR) -> list[str]:
    """Names of the weights a low-rank optimizer projects: `apollo.routing.select_targets`, the one target
    selection of this project, with Trainer's default ``"all-linear"`` (every linear layer but the output head)."""
    return routing.select_targets(model, target_modules)


def param_groups(model: nn.Module, target_modules: TargetSpec = ALL_LINEAR, *,
                 weight_decay: float = 0.0, **lowrank_options: Any) -> list[dict[str, Any]]:
    """``[regular, no_decay, low_rank]`` param groups (empty regular/no_decay groups are left out).

    low_rank: the weights of `select_targets` with `lowrank_options` and ``weight_decay``; no_decay: the
    other 1-D tensors (weight decay 0); regular: the other tensors (``weight_decay``). Every trainable
    parameter lands in exactly one group; the counts are logged.
    """
    targets = set(select_targets(model, target_modules))
    by_name = dict(model.named_parameters())
    low_rank = [by_name[name] for name in by_name if name in targets]
    chosen = {id(p) for p in low_rank}
    rest = [(n, p) for n, p in model.named_parameters() if routing.trainable(p) and id(p) not in chosen]
    regular = [p for _, p in rest if p.dim() >= 2]
    no_decay = [p for _, p in rest if p.dim() < 2]
    groups = [{"params": regular, "name": "regular", "weight_decay": weight_decay},
              {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
              {"params": low_rank, "name": "low_rank", "weight_decay": weight_decay, **lowrank_options}]
    groups = [group for group in groups if group["params"] or group["name"] == "low_rank"]
    routing.check_coverage(model, groups, f"apollo.hf.param_groups (target_modules={target_modules!r})")
    return groups


# ------------------------------------------------------------------------------------- building


def _class_options(optimizer_class: type) -> tuple[set[str], set[str]]:
    """(optimizer keyword options, low-rank group keys) of APOLLO or GaLore."""
    signature = set(inspect.signature(optimizer_class.__init__).parameters) - {"self", "params", "lr", "weight_decay"}
    return signature, {"rank", *optimizer_class.lowrank_defaults}


def build(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, *,
          target_modules: str | list[str] | tuple[str, ...] | None = None, **options: Any) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`, with Trainer's weight-decay split (see the module docstring).

    apollo, apollo_mini, apollo_svd, galore: low-rank weights from `select_targets(model, target_modules)`
    (None: ``"all-linear"``), settings = the preset's (``apollo.PRESETS``; rank None = hidden/4) under
    `options` (the keys of `apollo.build_optimizer`). adamw: ``torch.optim.AdamW`` over the same
    regular/no_decay split (``betas``, ``eps``). Any other registered name goes to
    `apollo.build_optimizer` unchanged (it decides its own routing and weight decay; ``target_modules``
    is then refused). Options that are None take the default.
    """
    from . import build_optimizer, canonical_name

    key = canonical_name(name)
    options = {k: v for k, v in options.items() if v is not None}
    if key in LOW_RANK:
        optimizer_class = LOW_RANK[key]
        optimizer_keys, lowrank_keys = _class_options(optimizer_class)
        unknown = sorted(set(options) - optimizer_keys - lowrank_keys)
        if unknown:
            raise ValueError(f"optimizer {key!r} does not take option(s) {', '.join(unknown)} "
                             f"(it takes {', '.join(sorted(optimizer_keys | lowrank_keys))})")
        lowrank = {**PRESETS[key], **{k: v for k, v in options.items() if k in lowrank_keys}}
        lowrank = {k: v for k, v in lowrank.items() if k in lowrank_keys}  # galore's preset has no proj
        if lowrank.get("rank") is None:
            lowrank["rank"] = _default_rank(model)
        groups = param_groups(model, ALL_LINEAR if target_modules is None else target_modules,
                              weight_decay=weight_decay, **lowrank)
        kwargs = {k: v for k, v in options.items() if k in optimizer_keys}
        return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if target_modules is not None:
        raise ValueError(f"optimizer {key!r} has no low-rank weights: target_modules applies to "
                         f"{', '.join(LOW_RANK)} only")
    if key == "adamw":
        unknown = sorted(set(options) - {"betas", "eps"})
        if unknown:
            raise ValueError(f"optimizer 'adamw' does not take option(s) {', '.join(unknown)} (it takes betas, eps)")
        if any(is_quantized(p) for p in model.parameters()):
            raise ValueError("torch.optim.AdamW cannot update int8 weights: choose a low-rank optimizer")
        groups = [group for group in param_groups_without_targets(model, weight_decay) if group["params"]]
        params = [p for group in groups for p in group["params"]]
        fused = {"fused": True} if params and all(p.device.type == "cuda" for p in params) else {}
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **options, **fused)
    return build_optimizer(key, model, lr=lr, weight_decay=weight_decay, **options)


def param_groups_without_targets(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """``[regular, no_decay]`` for an optimizer without low-rank weights (AdamW): Trainer's decay split."""
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("apollo.hf: %d tensors with weight decay, %d without", sum(p.dim() >= 2 for p in params),
                sum(p.dim() < 2 for p in params))
    return [{"params": [p for p in params if p.dim() >= 2], "name": "regular", "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "name": "no_decay", "weight_decay": 0.0}]


class OptimizerFactory:
    """The first element of ``Trainer(optimizer_cls_and_kwargs=(OptimizerFactory, kwargs))``.

    transformers instantiates it without arguments and calls the instance with ``(model, **kwargs)``;
    kwargs are those of `build`: ``name`` (default "apollo"), ``lr`` (required: give Trainer's
    ``learning_rate``, the schedule multiplies it), ``weight_decay``, ``target_modules`` and options.
    """

    def __call__(self, model: nn.Module, *, lr: float, name: str = "apollo", weight_decay: float = 0.0,
                 target_modules: str | list[str] | tuple[str, ...] | None = None,
                 **options: Any) -> torch.optim.Optimizer:
        return build(name, model, lr=lr, weight_decay=weight_decay, target_modules=target_modules, **options)


# ------------------------------------------------------------------------- TrainingArguments


def parse_optim_args(text: str | None) -> dict[str, str]:
    """``"rank=1, scale=128"`` -> ``{"rank": "1", "scale": "128"}``: transformers' reading of
    ``optim_args`` (spaces dropped, comma-separated ``key=value``); ValueError for a malformed piece."""
    if not text:
        return {}
    result = {}
    for piece in text.replace(" ", "").split(","):
        if piece.count("=") != 1 or not piece.split("=")[0]:
            raise ValueError(f"optim_args {text!r}: {piece!r} is not key=value")
        key, value = piece.split("=")
        result[key] = value
    return result


def convert_value(key: str, text: str) -> Any:
    """An option value given as text, in the type the optimizer expects (ValueError naming the key)."""
    try:
        if key in _INT_KEYS:
            return int(text)
        if key in _FLOAT_KEYS:
            return float(text)
        if key in _BOOL_KEYS:
            return _BOOL_WORDS[text.lower()]
    except (ValueError, KeyError):
        kind = "an integer" if key in _INT_KEYS else "a number" if key in _FLOAT_KEYS else "true or false"
        raise ValueError(f"optim_args {key}={text}: must be {kind}") from None
    if key not in _INT_KEYS | _FLOAT_KEYS | _BOOL_KEYS:  # an option this module does not know: read a literal
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    return text


def training_args_kwargs(args: Any) -> dict[str, Any]:
    """`OptimizerFactory` kwargs from a ``transformers.TrainingArguments``.

    ``optim``: apollo_adamw, galore_adamw (with transformers' own defaults for them, see
    ``TRAINER_OPTIMS``), adamw_torch(_fused). ``optim_args`` keys are our option names; the key
    ``optimizer=NAME`` picks any registered optimizer instead (with its own presets, e.g. apollo_mini).
    lr and weight decay come from the TrainingArguments fields, betas and eps only where the user changed
    them from TrainingArguments' defaults (`adam_settings`: otherwise the optimizer's own), the target spec
    from ``optim_target_modules`` (None: ``"all-linear"``).
    """
    optim = str(getattr(args.optim, "value", args.optim))
    raw = parse_optim_args(args.optim_args)
    if "optimizer" in raw:
        name, defaults = raw.pop("optimizer"), {}
    elif optim in TRAINER_OPTIMS:
        name, defaults = TRAINER_OPTIMS[optim]
    elif optim.endswith("layerwise"):
        raise ValueError(f"optim={optim!r}: apollo.hf builds joint optimizers only (layer-wise updates inside "
                         f"Trainer are not supported); use optim={optim.removesuffix('_layerwise')!r}")
    else:
        raise ValueError(f"optim={optim!r} is not one apollo.hf builds: use one of {', '.join(TRAINER_OPTIMS)}, "
                         f"or optim_args 'optimizer=NAME'")
    for key in raw:
        if key in _TRAINING_ARGS_FIELDS:
            raise ValueError(f"optim_args {key}=...: set TrainingArguments.{_TRAINING_ARGS_FIELDS[key]} instead")
    options = {**defaults, **{key: convert_value(key, value) for key, value in raw.items()}}
    kwargs = {"name": name, "lr": args.learning_rate, "weight_decay": args.weight_decay,
              **adam_settings(name, args), **options}
    from . import canonical_name

    if canonical_name(name) in LOW_RANK:
        kwargs["target_modules"] = ALL_LINEAR if args.optim_target_modules is None else args.optim_target_modules
    return kwargs


def adam_settings(name: str, args: Any) -> dict[str, Any]:
    """``betas`` / ``eps`` for the optimizer `name` from TrainingArguments, only where the user changed them.

    TrainingArguments always carries adam_beta1/2 and adam_epsilon (0.9, 0.999, 1e-8 by default); passing
    those defaults on would replace an optimizer's own (SOAP's betas are (0.95, 0.95), APOLLO's eps 1e-6).
    So a field left at its dataclass default is not passed; a changed one is, and an optimizer without that
    hyper-parameter refuses it with one line. The choice is logged.
    """
    import dataclasses

    from . import REGISTRY, canonical_name

    key = canonical_name(name)
    defaults = {f.name: f.default for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
    default_of = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}
    changed = {field for field, fallback in default_of.items()
               if getattr(args, field) != defaults.get(field, fallback)}
    settings: dict[str, Any] = {}
    if changed & {"adam_beta1", "adam_beta2"}:
        settings["betas"] = (args.adam_beta1, args.adam_beta2)
    if "adam_epsilon" in changed:
        settings["eps"] = args.adam_epsilon
    for option, fields in (("betas", "adam_beta1/adam_beta2"), ("eps", "adam_epsilon")):
        if option in settings and option not in REGISTRY[key].options:
            raise ValueError(f"TrainingArguments.{fields} is set but optimizer {key!r} has no {option}: "
                             f"leave it at its default")
    logger.info("apollo.hf: %s with %s", key, ", ".join(f"{k}={v} (from TrainingArguments)" for k, v in settings.items())
                or "its own betas and eps (TrainingArguments' adam_beta1/2 and adam_epsilon are at their defaults)")
    return settings


def from_training_args(args: Any) -> tuple[type[OptimizerFactory], dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=from_training_args(args))``: see `training_args_kwargs`."""
    return OptimizerFactory, training_args_kwargs(args)


# -------------------------------------------------------------------------------- LLaMA-Factory


def _read(source: Any, key: str, default: Any) -> Any:
    if isinstance(source, Mapping):
        return source.get(key, default)
    return getattr(source, key, default)


def llamafactory_kwargs(finetuning_args: Any, training_args: Any) -> dict[str, Any]:
    """`OptimizerFactory` kwargs from LLaMA-Factory's keys (a mapping, or its FinetuningArguments).

    ``use_apollo`` -> name "apollo" with the ``apollo_*`` keys, ``use_galore`` -> "galore" with the
    ``galore_*`` keys (``LLAMAFACTORY_KEYS``: names and LLaMA-Factory's defaults); a ``*_target`` of
    "all" is ``"all-linear"``, else a comma-separated string or list of module-name substrings. lr and
    weight decay come from `training_args`, betas and eps where changed (`adam_settings`) (Hugging Face TrainingArguments, whose
    ``optim`` must be adamw_torch, as LLaMA-Factory requires). Layer-wise is refused.
    """
    use_apollo, use_galore = bool(_read(finetuning_args, "use_apollo", False)), bool(_read(finetuning_args, "use_galore", False))
    if use_apollo == use_galore:
        raise ValueError("set exactly one of use_apollo and use_galore" if use_apollo else
                         "neither use_apollo nor use_galore is set: nothing for apollo.hf to build")
    family = "apollo" if use_apollo else "galore"
    options = {}
    for key, (ours, default) in LLAMAFACTORY_KEYS[family].items():
        options[ours] = _read(finetuning_args, key, default)
    if options.pop("layerwise"):
        raise ValueError(f"{family}_layerwise: layer-wise updates inside Trainer are not supported by apollo.hf; "
                         f"set {family}_layerwise false")
    target = options.pop("target_modules")
    if isinstance(target, str):
        target = [t.strip() for t in target.split(",") if t.strip()]
    target = ALL_LINEAR if list(target) == ["all"] else list(target)
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"LLaMA-Factory's {family} runs with optim adamw_torch, got optim={optim!r}")
    return {"name": family, "lr": training_args.learning_rate, "weight_decay": training_args.weight_decay,
            **adam_settings(family, training_args), "target_modules": target, **options}


def from_llamafactory(finetuning_args: Any, training_args: Any) -> tuple[type[OptimizerFactory], dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=from_llamafactory(keys, args))``: see `llamafactory_kwargs`."""
    return OptimizerFactory, llamafactory_kwargs(finetuning_args, training_args)
