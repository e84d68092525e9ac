r"""The update's scratch in the estimate: each optimizer's model comes from its spec
(`apollo.spec.OptimizerSpec.scratch_bytes`; the models and their derivations are in apollo/scratch.py and
beside each optimizer's math). An optimizer without one is an error (`update_scratch` raises), not zero: the
planner would otherwise credit it with a free step. Here: int8 weights' extra copies, torch AdamW's CUDA
foreach path and the fused low-rank chunk, which depend on the whole step rather than one parameter.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

import apollo
from apollo import scratch as models
from apollo.registry import RegistryView
from apollo.quant import is_quantized
from train.memory.meta import _grad_bytes

#: the signature of a scratch model: (param, group, *, name, p, device) -> bytes of one parameter's update
ScratchModel = Callable[..., int]

# Old private names of the models, kept importable (tests and callers reached them as train.memory._x)
_adamw_scratch, _mixed, _state_bytes = models.adamw, models.mixed, models.state_number_bytes
_low_rank_family_scratch, _fused_low_rank_scratch, fused_step_scratch = (models.low_rank_family, models.fused_low_rank,
                                                                          models.fused_step)
_fira_scratch, _scale_scratch, _muon_scratch = models.fira, models.scale, models.muon
_adam_mini_scratch, _soap_scratch, _adamw8bit_scratch = models.adam_mini, models.soap, models.adamw8bit


#: optimizer name -> the scratch model of one parameter's update (a view of the specs)
SCRATCH: Mapping[str, ScratchModel] = RegistryView(
    lambda: {name: spec.scratch_bytes for name, spec in apollo.REGISTRY.items() if spec.scratch_bytes is not None})


def update_scratch(param: torch.Tensor, group: dict | None, *, name: str, p: int, device: str,
                   stochastic_round: bool) -> int:
    """Temporaries of one parameter's update (module docstring); `group` is its param group.

    Raises ValueError for an optimizer without an entry in `SCRATCH`.
    """
    model = SCRATCH.get(name)
    if model is None:
        raise ValueError(f"train.memory has no update-scratch model for optimizer {name!r}: give its OptimizerSpec "
                         f"a scratch_bytes(param, group, *, name, p, device)")
    scratch = model(param, group, name=name, p=p, device=device)
    if is_quantized(param):  # the float32 copy, and dequantising / re-quantising it (a float32 temporary, q, noise)
        n = param.numel()
        scratch = 4 * n + max(scratch, 4 * n, n * (1 + (4 if stochastic_round else 0)))
    return scratch


def _torch_adamw(name: str, group: dict | None) -> bool:
    """Whether this parameter's update is torch AdamW's (its spec's ``torch_adamw_groups`` says so for its group)."""
    spec = apollo.REGISTRY.get(name)
    return spec is not None and spec.torch_adamw_groups is not None and bool(spec.torch_adamw_groups(group))


def step_scratch(per_param, trainable: list[torch.Tensor], groups: dict[int, dict], param_groups: list[dict], *,
                 name: str, p: int, device: str) -> tuple[int, str]:
    """(bytes, note) of the update's scratch in normal mode: the largest parameter's (`per_param`: items with
    `.name` and `.scratch`), a fused low-rank chunk's, or torch AdamW's foreach path on CUDA (sqrt of every
    second moment at once: p N_all), whichever is largest. `groups`: id(param) -> its param group."""
    worst = max(per_param, key=lambda item: item.scratch)
    scratch, note = worst.scratch, f"temporaries of {worst.name}'s update"
    foreach_adamw = [q for q in trainable if _torch_adamw(name, groups.get(id(q)))]
    if device == "cuda" and foreach_adamw:
        joint = sum(_grad_bytes(q, p) for q in foreach_adamw)  # the foreach path takes sqrt(v) of all at once
        if joint >= scratch:
            scratch, note = joint, "torch AdamW (foreach): sqrt of every second moment at once"
    spec = apollo.REGISTRY.get(name)
    if spec is not None and spec.fused_low_rank:  # apollo/fused.py steps a chunk of weights at a time
        chunked = max((models.fused_step(g, name=name, p=p, device=device)
                       for g in param_groups if g.get("rank") is not None), default=0)
        if chunked > scratch:
            scratch, note = chunked, "the fused low-rank step's largest chunk (P, R, direction)"
    return scratch, note
