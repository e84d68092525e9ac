"""apollo's optimizers inside torchtitan 0.3, from a pip install (no fork). Imports torchtitan.

In a torchtitan environment, ``pip install --no-deps /path/to/this/repo`` (``apollo`` needs torch only), then::

    torchrun --nproc_per_node 1 -m torchtitan.train \\
        --module apollo.integrations.torchtitan --config apollo_mini_llama3_debugmodel

(from a torchtitan v0.3.0 checkout, whose ``tests/assets`` hold the debug model's tokenizer and C4 sample).

- `ApolloOptimizersContainer`: torchtitan's ``OptimizersContainer`` whose ``optimizer_name`` also
  resolves every name (and alias) of `apollo.REGISTRY`, built by `titan_groups.build_from_groups`
  (torchtitan's ``fused``/``foreach`` ignored, ``param_names`` kept for its FQN-keyed checkpoint).
  torchtitan's own names (Adam, AdamW, DistMuon) still resolve. Checkpoints: torchtitan materialises
  state with one zero-gradient, lr=0 ``step()`` before saving or loading and restores only the state
  keys that step created; every registered optimizer creates its whole state on its first step
  (tests/apollo/test_torchtitan.py round-trips APOLLO and APOLLO-Mini through DCP).
- `optimizer_config(name, lr, ...)`: the container's Config with `titan_groups.group_plan`'s groups
  (`apollo.build_optimizer`'s routing as FQN patterns of torchtitan's Llama-3; every registered name but
  adam_mini, whose groups are written by hand).
- `apollo_llama3_debugmodel`, `apollo_mini_llama3_debugmodel`: torchtitan's ``llama3_debugmodel`` job
  with that optimizer (rank: a quarter of the model dim for APOLLO, 1 for APOLLO-Mini; lr 1e-2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..registry import canonical_name
from . import titan_groups
from .titan_groups import LLAMA3, FqnPatterns, build_from_groups


class ApolloOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` that also builds apollo's registered optimizers (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        try:
            key = canonical_name(name)
        except ValueError:  # not ours: torchtitan's Adam, AdamW, DistMuon (or its NotImplementedError)
            return OptimizersContainer._resolve_optimizer_factory(name)
        return lambda groups, **kwargs: build_from_groups(key, groups, **kwargs)


def optimizer_config(name: str, lr: float, weight_decay: float = 0.0, *, fqns: FqnPatterns = LLAMA3,
                     hidden_size: int | None = None, **options: Any) -> ApolloOptimizersContainer.Config:
    """`ApolloOptimizersContainer.Config` that routes like `apollo.build_optimizer(name, model, lr, weight_decay,
    **options)` (see `titan_groups.group_plan` for the names, options and the pattern)."""
    configs, constructor = titan_groups.group_plan(name, lr, weight_decay, fqns=fqns,
                                                   hidden_size=hidden_size, **options)
    key = configs[0]["optimizer_name"]
    return ApolloOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(**config) for config in configs],
        optimizer_factory_kwargs_by_name={key: constructor} if constructor else {},
    )


def _llama3_debugmodel(name: str, **options: Any):
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = llama3_debugmodel()
    config.optimizer = optimizer_config(name, lr=1e-2, hidden_size=config.model_spec.model.dim, **options)
    return config


def apollo_llama3_debugmodel():
    """torchtitan's Llama-3 debug job (dim 256, 6 layers) with APOLLO, rank 64 (dim / 4), lr 1e-2."""
    return _llama3_debugmodel("apollo")


def apollo_mini_llama3_debugmodel():
    """torchtitan's Llama-3 debug job with APOLLO-Mini (rank 1, tensor-wise scaling, scale 128), lr 1e-2."""
    return _llama3_debugmodel("apollo_mini")
