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

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .. import factory
from ..registry import REGISTRY, RegistryView, build_optimizer, canonical_name


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


#: Group keys the constructors derive themselves (Flora numbers its parameters' seeds from the group order).
_DERIVED_GROUP_KEYS = ("initial_seed",)
_KINDS = ("embedding", "head", "matrices", "vectors")  # the order a probe parameter's kind is looked up in


def _not(*patterns: str) -> str:
    """A pattern that matches where none of `patterns` does (first-match-wins then keeps any group order)."""
    return rf"^(?!.*?(?:{'|'.join(f'(?:{p})' for p in patterns)}))"


def _any(*patterns: str) -> str:
    return patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)


class _ProbeLlama(torch.nn.Module):
    """A transformers-style LLaMA skeleton in torch alone (a torchtitan environment has no transformers): the
    module names, types and parameter order of ``LlamaForCausalLM`` (``model.embed_tokens``,
    ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the RMSNorms, an untied
    ``lm_head``) and the accessors the builders read; no forward (the builders only route parameters)."""

    def __init__(self, config) -> None:
        super().__init__()
        width, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size

        def linear(fan_in: int, fan_out: int) -> torch.nn.Linear:
            return torch.nn.Linear(fan_in, fan_out, bias=False)

        layers = torch.nn.ModuleList()
        for _ in range(config.num_hidden_layers):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, linear(width, width))
            layer.mlp = torch.nn.Module()
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj = (
                linear(width, inner), linear(width, inner), linear(inner, width))
            layer.input_layernorm, layer.post_attention_layernorm = torch.nn.RMSNorm(width), torch.nn.RMSNorm(width)
            layers.append(layer)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, width)
        self.model.layers = layers
        self.model.norm = torch.nn.RMSNorm(width)
        self.lm_head = linear(width, vocab)
        self.config = config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def get_decoder(self) -> torch.nn.Module:
        return self.model


def _probe(hidden_size: int | None, rank: int | None) -> torch.nn.Module:
    """A one-layer LLaMA on the meta device (no memory) with every kind of `FqnPatterns` (untied head), wide
    enough for `rank`. Without `hidden_size` its config has none, so a builder that would take a quarter of it
    refuses (the default rank must come from the real model)."""
    from types import SimpleNamespace

    width = hidden_size or max(64, 4 * (rank or 0))
    config = dict(vocab_size=2 * width, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=width, tie_word_embeddings=False)
    with torch.device("meta"):
        model = _ProbeLlama(SimpleNamespace(**config))
    if hidden_size is None:
        model.config = SimpleNamespace(**{k: v for k, v in config.items() if k != "hidden_size"})
    return model


def group_plan(name: str, lr: float, weight_decay: float = 0.0, *, fqns: FqnPatterns = LLAMA3,
               hidden_size: int | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(configs, constructor_kwargs)`` reproducing `apollo.build_optimizer(name, model, lr, weight_decay, **options)`.

    Derived from the optimizer's own builder (its spec's routing), for any registered name: the builder runs over
    a probe model (`_probe`: a one-layer LLaMA on the meta device) and each of its param groups, in its order,
    becomes one config: ``pattern`` the `fqns` patterns of the kinds of parameter it holds (embedding, head,
    decoder matrices, vectors), ``optimizer_name`` the canonical name, ``optimizer_kwargs`` the group's settings
    as the builder made them (lr and weight_decay included: SCALE's AdamW group has its adam_lr). The group with
    the most kinds (the last of equals) is the catch-all, the other groups' patterns negated, so a parameter of
    no known kind lands where the builder puts "the rest"; one group is ``.*``. constructor_kwargs: the options
    that are no group key but a parameter of the spec's ``from_groups`` (APOLLO's ``fused``), for
    ``optimizers_container.optimizer_factory_kwargs_by_name[name]``; ``ParamGroupConfig(**config)`` each.

    Options as in `build_optimizer` (None = default, checked by the builder); rank None means the builder's
    default, a quarter of `hidden_size` (refused without it). `fqns` stands in for the builders' module-type
    rules (`LLAMA3` for torchtitan's Llama-3, `HF_LLAMA` for this harness's model), so ``target_modules`` is
    refused, and so is an optimizer whose groups split one kind (Adam-mini's blocks follow q/k/v projections and
    head counts, and torchtitan fuses wqkv): give its ``ParamGroupConfig`` entries by hand (the container builds
    any registered name). SCALE needs an untied head (a tied one is no parameter of its own).
    """
    key = canonical_name(name)
    options = {k: v for k, v in options.items() if v is not None}
    if "target_modules" in options:
        raise ValueError("target_modules is a module-name rule; give fqns (FqnPatterns) instead")
    probe = _probe(hidden_size, options.get("rank"))
    try:
        optimizer = build_optimizer(key, probe, lr, weight_decay, **options)
    except ValueError as error:
        if "rank is required" in str(error):
            raise ValueError(f"{key}: give rank, or hidden_size to take a quarter of (the default rank)") from None
        raise
    kind_of = {id(p): next(kind for kind in _KINDS if re.search(getattr(HF_LLAMA, kind), n))
               for n, p in probe.named_parameters()}  # every probe parameter is of one kind
    groups = [(group, [kind for kind in _KINDS if kind in {kind_of[id(p)] for p in group["params"]}])
              for group in optimizer.param_groups]
    held = [kind for _, kinds in groups for kind in kinds]
    if len(held) != len(set(held)):
        split = sorted({kind for kind in held if held.count(kind) > 1})
        raise ValueError(f"no FQN-pattern routing for {key!r} (its groups split the {', '.join(split)} by module "
                         f"names or shapes); write its ParamGroupConfig entries with optimizer_name {key!r} by hand")
    patterns = [_any(*(getattr(fqns, kind) for kind in kinds)) for _, kinds in groups]
    rest = max(reversed(range(len(groups))), key=lambda index: len(groups[index][1]))
    patterns[rest] = _not(*(p for index, p in enumerate(patterns) if index != rest)) if len(groups) > 1 else r".*"
    skipped = ("params", *_DROPPED_GROUP_KEYS, *_DERIVED_GROUP_KEYS)
    configs = [{"pattern": pattern, "optimizer_name": key,
                "optimizer_kwargs": {k: v for k, v in group.items() if k not in skipped}}
               for pattern, (group, _) in zip(patterns, groups)]
    group_keys = {k for group, _ in groups for k in group}
    accepted = inspect.signature(REGISTRY[key].from_groups).parameters
    constructor = {k: v for k, v in options.items() if k not in group_keys and k in accepted}
    return configs, constructor


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

