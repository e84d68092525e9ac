"""Which parameters an optimizer routes where: the one target selection, and the coverage check.

Every low-rank optimizer (`apollo.param_groups`, Fira), `apollo.hf`, `apollo.quantize_model` and the
training harness's parameter counts choose their target weights with `select_target_modules`, which
accepts one set of forms:

- ``"all-linear"`` (or ``"all_linear"``): every linear layer except the output head
  (``model.get_output_embeddings()``) and any layer whose weight is the input embedding (a tied head);
- any other string: a regular expression that must match a module's whole name (``re.fullmatch``,
  transformers' rule for ``optim_target_modules``), e.g. ``r".*\\.(q|v)_proj"``;
- a list or tuple of strings: a module is chosen when its name equals an entry, contains it as a
  substring, or fully matches it as a regex (``("attn", "mlp")`` picks LLaMA's q/k/v/o and
  gate/up/down projections).

Anything else is refused with one line, as is a spec that selects nothing. Linear layers are
``nn.Linear``, int8 `apollo.quant.QuantLinear`, and transformers' GPT-2 ``Conv1D`` when transformers is
installed. `check_coverage` raises (never an assert, which ``python -O`` strips) unless every trainable
parameter lands in exactly one group, and logs the counts per group.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
#: The harness's low-rank targets on LLaMA: the attention and MLP projections.
DEFAULT_TARGETS = ("attn", "mlp")

TargetSpec = str | Sequence[str]


def trainable(param: torch.Tensor) -> bool:
    """A parameter an optimizer must update: requires_grad, or an int8 weight (gradient in ``float_grad``)."""
    from .quant import is_quantized
    return param.requires_grad or is_quantized(param)


def linear_types() -> tuple[type, ...]:
    """nn.Linear, QuantLinear and (when transformers is installed) GPT-2's Conv1D."""
    from .quant import QuantLinear
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # `import apollo` needs torch only
        return (nn.Linear, QuantLinear)
    return (nn.Linear, Conv1D, QuantLinear)


def check_target_spec(target_modules: Any) -> None:
    """One-line ValueError unless `target_modules` is "all-linear", a regex string or a list/tuple of strings."""
    if isinstance(target_modules, str):
        if not is_all_linear(target_modules):
            try:
                re.compile(target_modules)
            except re.error as error:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {error}")
        return
    if isinstance(target_modules, (list, tuple)) and target_modules and all(isinstance(t, str) for t in target_modules):
        return
    raise ValueError(f"target_modules must be 'all-linear', a regex string matched against whole module names, or a "
                     f"non-empty list of name substrings/regexes; got {target_modules!r}")


def is_all_linear(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == ALL_LINEAR


def name_matches(target_modules: TargetSpec, module_name: str) -> bool:
    """Does `module_name` match a (checked) regex string or list spec? ("all-linear" is decided by the caller.)"""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(entry == module_name or entry in module_name or re.fullmatch(entry, module_name) is not None
               for entry in target_modules)


def select_target_modules(model: nn.Module, target_modules: TargetSpec = DEFAULT_TARGETS, *,
                          types: tuple[type, ...] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer (`linear_types()`, or `types`) that `target_modules` chooses."""
    check_target_spec(target_modules)
    types = linear_types() if types is None else types
    excluded: set[int] = set()
    all_linear = is_all_linear(target_modules)
    if all_linear:
        for getter in ("get_output_embeddings", "get_input_embeddings"):
            module = getattr(model, getter)() if hasattr(model, getter) else None
            if module is not None and getattr(module, "weight", None) is not None:
                excluded.add(id(module.weight))
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, types) and id(getattr(module, "weight", None)) not in excluded
            and (all_linear or name_matches(target_modules, name))]


def select_targets(model: nn.Module, target_modules: TargetSpec = DEFAULT_TARGETS) -> list[str]:
    """Names of the weights a low-rank optimizer projects (trainable, 2-D, of a chosen linear layer), in the
    model's parameter order, each once. ValueError (one line) for a bad spec or one that selects nothing."""
    chosen = {id(module.weight) for _, module in select_target_modules(model, target_modules)
              if module.weight.dim() == 2 and trainable(module.weight)}
    names, seen = [], set()
    for name, param in model.named_parameters():
        if id(param) in chosen and id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    if not names:
        hint = (" (a string is a regex matched against the whole name: use a list such as "
                f"[{target_modules!r}] for a substring)" if isinstance(target_modules, str) else "")
        raise ValueError(f"target_modules {target_modules!r} selects no trainable 2-D weight of a linear layer in "
                         f"{type(model).__name__}{hint}: name the projection layers (e.g. ['q_proj', 'v_proj']) or "
                         f"use 'all-linear'")
    return names


def target_weights(model: nn.Module, target_modules: TargetSpec = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """The parameters of `select_targets`, in the same order."""
    params = dict(model.named_parameters())
    return [params[name] for name in select_targets(model, target_modules)]


def check_coverage(model: nn.Module, groups: Iterable[dict[str, Any]], who: str, *,
                   log: logging.Logger | None = logger) -> None:
    """Raise unless every trainable parameter of `model` is in exactly one of `groups` (and nothing else is);
    log the tensor and value counts of each group (by its "name", else its index) on `log` (the caller's
    module logger, so that its level applies; None: the caller logs its own line)."""
    groups = list(groups)
    expected = {id(p): p for p in model.parameters() if trainable(p)}
    seen: set[int] = set()
    for group in groups:
        for param in group["params"]:
            if id(param) in seen:
                raise RuntimeError(f"{who}: a parameter of shape {tuple(param.shape)} landed in two groups")
            if id(param) not in expected:
                raise RuntimeError(f"{who}: a group holds a parameter of shape {tuple(param.shape)} that is not a "
                                   f"trainable parameter of the model")
            seen.add(id(param))
    missing = [p for key, p in expected.items() if key not in seen]
    if missing:
        raise RuntimeError(f"{who}: {len(missing)} of {len(expected)} trainable parameters landed in no group "
                           f"(first shape {tuple(missing[0].shape)})")
    if log is None:
        return
    counts = ", ".join(f"{group.get('name', index)} {len(group['params'])} tensors "
                       f"({sum(p.numel() for p in group['params']) / 1e6:.2f}M values)"
                       for index, group in enumerate(groups))
    log.info("%s: %s", who, counts)
