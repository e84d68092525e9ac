r"""`apollo.build_optimizer`'s routing as torchtitan param groups (FQN regex patterns), torch only.

torchtitan 0.3's ``OptimizersContainer`` routes parameters by ``ParamGroupConfig(pattern,
optimizer_name, optimizer_kwargs)``: each trainable parameter goes to the first config whose pattern
``re.search``-es its FQN, configs with the same ``optimizer_name`` become the param groups of one
optimizer, in config order, and each group is ``{params, param_names, fused, foreach, **optimizer_kwargs}``.
This module holds the two halves that need no torchtitan:

- `group_plan(name, lr, ...)`: the pattern configs (as plain dicts) and the constructor kwargs that
  reproduce `apollo.build_optimizer(name, model, lr, ...)`'s groups, from the FQN patterns of a model
  family (`LLAMA3`, `HF_LLAMA`: `FqnPatterns`). Groups keep the builders' order (for the low-rank
  family ``[regular, low_rank]``: a parameter's 1-based position over the groups seeds its random
  projection, so the order is part of the update); a catch-all group is the others' patterns negated
  (``^(?!.*?(?:A|B))``), so first-match-wins gives the same split whichever group is listed first.
- `build_from_groups(name, groups, **kwargs)`: any registered optimizer from such groups; torchtitan's
  ``fused``/``foreach`` group keys are dropped (they are torch.optim.AdamW's flags: APOLLO's own
  ``fused`` is a constructor kwarg), ``param_names`` is kept (torchtitan keys the checkpoint by it;
  every optimizer here ignores it). A group that sets ``rank`` under a preset name (``apollo_mini``...)
  gets that preset's settings for the keys it leaves out.

`route(named_parameters, configs)` is torchtitan's first-match rule, for checking a plan on a model
without torchtitan (tests/apollo/test_torchtitan_routing.py does that against `build_optimizer`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .. import adamw8bit, factory, fira, flora, galore8bit, muon, scale, soap
from ..registry import REGISTRY, RegistryView, canonical_name

@dataclass(frozen=True)
class FqnPatterns:
    """FQN regexes of one model family's parameter kinds, the module-type rules of the builders as names."""

    matrices: str   # the Linear weights of the decoder layers: low-rank (APOLLO, GaLore, Fira), Muon, SCALE "hidden"
    vectors: str    # the 1-D parameters (norm weights, biases): SOAP's and SCALE's Adam parameters
    embedding: str  # the input embedding's weight (SCALE "embedding")
    head: str       # the untied output head's weight (SCALE "lm_head")


#: torchtitan's Llama-3 (``layers.N.attention.qkv_linear.wqkv``, ``.wo``, ``feed_forward.w1/w2/w3``,
#: ``tok_embeddings``, ``lm_head``, ``*_norm``). Activation-checkpoint or compile wrappers may insert path
#: segments, hence ``(?:.*\.)?``; ``attention_norm`` is no matrix (no dot right after "attention").
LLAMA3 = FqnPatterns(
    matrices=r"(?:^|\.)layers\.\d+\.(?:.*\.)?(?:attention|feed_forward)\.(?:.*\.)?weight$",
    vectors=r"(?:norm\.weight|\.bias)$",
    embedding=r"(?:^|\.)tok_embeddings\.weight$",
    head=r"(?:^|\.)lm_head\.weight$",
)
#: This harness's transformers LLaMA (``model.layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ``embed_tokens``...).
HF_LLAMA = FqnPatterns(
    matrices=r"(?:^|\.)layers\.\d+\.(?:.*\.)?(?:self_attn|mlp)\.(?:.*\.)?weight$",
    vectors=r"(?:norm\.weight|\.bias)$",
    embedding=r"(?:^|\.)embed_tokens\.weight$",
    head=r"(?:^|\.)lm_head\.weight$",
)

_DROPPED_GROUP_KEYS = ("fused", "foreach")  # torchtitan's implementation flags, meant for torch's Adam/AdamW


#: Registered name -> ``spec.from_groups`` (called as ``cls(groups, **kwargs)``), a view of the registry.
#: tests/apollo/test_torchtitan_routing.py checks this covers `apollo.optimizer_names()` exactly.
CONSTRUCTORS: Mapping[str, Callable[..., torch.optim.Optimizer]] = RegistryView(
    lambda: {name: spec.from_groups for name, spec in REGISTRY.items() if spec.from_groups is not None})


def build_from_groups(name: str, groups: Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """The registered optimizer `name` (or an alias) over torchtitan-style `groups`; `kwargs` go to its constructor.

    Drops each group's ``fused``/``foreach``; keeps ``param_names``; fills a ``rank``-carrying group of a
    preset (`apollo.PRESETS`) with the preset's other settings where the group leaves them out.
    """
    key = canonical_name(name)
    if key not in CONSTRUCTORS:
        raise ValueError(f"optimizer {key!r} is registered but its OptimizerSpec has no from_groups constructor")
    preset = {k: v for k, v in factory.PRESETS.get(key, {}).items() if k != "rank"}
    built = []
    for group in groups:
        group = {k: v for k, v in group.items() if k not in _DROPPED_GROUP_KEYS}
        if group.get("rank") is not None:
            group = {**preset, **group}
        built.append(group)
    return CONSTRUCTORS[key](built, **kwargs)


def _low_rank_setup(key: str, options: dict[str, Any], hidden_size: int | None) -> tuple[dict, dict]:
    """(constructor kwargs, low-rank group keys) as `factory.build_low_rank` / `fira.build` split them."""
    if key == "fira":
        constructor_keys, defaults, allowed = fira._OPTIMIZER_KEYS, fira.Fira.lowrank_defaults, fira.OPTIONS
    elif key == galore8bit.NAME:
        constructor_keys, defaults = galore8bit._OPTIMIZER_KEYS, galore8bit.GaLoreAdamW8bit.lowrank_defaults
        allowed = galore8bit.OPTIONS
    else:
        constructor_keys, defaults = factory._OPTIMIZER_KEYS, factory.PRESETS[key]
        allowed = factory.LOWRANK_OPTIONS["galore" if key == "galore" else "apollo"]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"optimizer {key!r} does not take option(s) {', '.join(unknown)}")
    constructor = {k: options.pop(k) for k in list(options) if k in constructor_keys}
    low_rank = {**defaults, **options}
    if low_rank.get("rank") is None:
        if hidden_size is None:
            raise ValueError(f"{key}: give rank, or hidden_size to take a quarter of (the presets' rank)")
        low_rank["rank"] = max(1, hidden_size // 4)
    return constructor, low_rank


def _not(*patterns: str) -> str:
    """A pattern that matches where none of `patterns` does (first-match-wins then keeps any group order)."""
    return rf"^(?!.*?(?:{'|'.join(f'(?:{p})' for p in patterns)}))"


def _check(key: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"optimizer {key!r} does not take option(s) {', '.join(unknown)} here")


def group_plan(name: str, lr: float, weight_decay: float = 0.0, *, fqns: FqnPatterns = LLAMA3,
               hidden_size: int | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(configs, constructor_kwargs)`` reproducing `apollo.build_optimizer(name, model, lr, weight_decay, **options)`.

    configs: dicts with ``pattern``, ``optimizer_name`` (the canonical name) and ``optimizer_kwargs``
    (lr, weight_decay, the group's name and settings), in `build_optimizer`'s group order:
    ``ParamGroupConfig(**config)`` each. constructor_kwargs: betas, eps, state_dtype, ... for
    ``optimizers_container.optimizer_factory_kwargs_by_name[name]``. Options as in `build_optimizer`
    (None = default); rank None means ``hidden_size // 4``. `fqns` stands in for the builders' module-type
    rules (`LLAMA3` for torchtitan's Llama-3, `HF_LLAMA` for this harness's model), so ``target_modules``
    is refused.

    Covered: adamw, adamw8bit, the low-rank family (apollo, apollo_mini, apollo_svd, galore, fira,
    galore_adamw8bit), muon,
    soap, flora (its groups in the model's parameter order: a parameter's position seeds its projection) and
    scale (untied heads: a tied head is no parameter of its own, and its pattern would match
    nothing). adam_mini's blocks follow q/k/v projections and head counts (torchtitan fuses wqkv): give
    its ``ParamGroupConfig`` entries by hand (the container builds any registered name).
    """
    key = canonical_name(name)
    options = {k: v for k, v in options.items() if v is not None}
    base = {"lr": lr, "weight_decay": weight_decay}

    def config(pattern: str, **group: Any) -> dict[str, Any]:
        return {"pattern": pattern, "optimizer_name": key, "optimizer_kwargs": {**base, **group}}

    if key == "adamw":
        _check(key, options, ("betas", "eps"))
        return [config(r".*")], options
    if key == "adamw8bit":
        _check(key, options, adamw8bit.OPTIONS)
        if options.pop("state_dtype", None) not in (None, "float32", torch.float32):
            raise ValueError("adamw8bit keeps uint8 codes with float32 scales: state_dtype must be None or float32")
        return [config(r".*", name="all")], options
    if key == "muon":
        _check(key, options, muon.OPTIONS)
        return [config(fqns.matrices, kind="muon", name="muon"),
                config(_not(fqns.matrices), kind="adamw", name="adamw")], options
    if key == "soap":
        _check(key, options, soap.OPTIONS)
        return [config(_not(fqns.vectors), name="rotated"), config(fqns.vectors, name="adam")], options
    if key == "flora":
        _check(key, options, flora.OPTIONS)
        constructor = {**flora.DEFAULTS, **options}
        if constructor["rank"] is None:
            if hidden_size is None:
                raise ValueError("flora: give rank, or hidden_size to take a quarter of")
            constructor["rank"] = max(1, hidden_size // 4)
        return [config(_not(fqns.vectors), name="matrices"), config(fqns.vectors, name="vectors")], constructor
    if key == "scale":
        _check(key, options, scale.OPTIONS)
        settings = {**scale.DEFAULTS, **options}
        norm, momentum = settings["norm"], settings["momentum"]
        configs = [
            config(fqns.embedding, name="embedding", norm=norm, rule="column_norm", norm_dim=0),
            config(fqns.head, name="lm_head", norm=norm, rule="momentum_column_norm", norm_dim=1, momentum=momentum),
            config(fqns.matrices, name="hidden", norm=norm, rule="column_norm", norm_dim=1),
            config(_not(fqns.embedding, fqns.head, fqns.matrices), name="adamw", norm=norm, rule="adamw"),
        ]
        configs[3]["optimizer_kwargs"]["lr"] = settings["adam_lr"]
        constructor = {"momentum": momentum, "norm": norm, "betas": tuple(settings["betas"]), "eps": settings["eps"],
                       "state_dtype": settings["state_dtype"]}
        return configs, constructor
    if key not in factory.PRESETS and key not in ("fira", galore8bit.NAME):
        raise ValueError(f"no FQN-pattern routing for {key!r} (its blocks follow module names and head counts); "
                         f"write its ParamGroupConfig entries with optimizer_name {key!r} by hand")
    if "target_modules" in options:
        raise ValueError("target_modules is a module-name rule; give fqns (FqnPatterns) instead")
    constructor, low_rank = _low_rank_setup(key, options, hidden_size)
    return [config(_not(fqns.matrices), name="regular"), config(fqns.matrices, name="low_rank", **low_rank)], constructor


def route(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
          configs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """torchtitan's ``_build_param_groups`` rule: optimizer name -> its groups, each ``{params, param_names,
    **optimizer_kwargs}``; first matching pattern wins, frozen parameters are skipped, and a pattern that
    matches nothing is a ValueError (as in torchtitan). FQNs are used as given (no wrapper stripping)."""
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    claimed: set[str] = set()
    groups: dict[str, list[dict[str, Any]]] = {}
    for config in configs:
        pattern = re.compile(config["pattern"])
        members = [(n, p) for n, p in named if n not in claimed and pattern.search(n)]
        if not members:
            raise ValueError(f"Optimizer param_groups pattern '{config['pattern']}' matched no parameters")
        claimed.update(n for n, _ in members)
        groups.setdefault(config["optimizer_name"], []).append(
            {"params": [p for _, p in members], "param_names": [n for n, _ in members], **config["optimizer_kwargs"]})
    return groups

