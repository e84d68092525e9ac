r"""Data-parallel arithmetic: DDP's gradient buckets and FSDP2's per-rank shards (bytes per process).

DDP buckets    with several processes: DDP's flat all-reduce buckets, one copy of every float gradient that
               requires grad, alive for the whole run. The harness's DDP (`train.distributed.BucketViewDDP`)
               keeps those gradients in the buckets (their .grad are views), so they are not counted
               again: each gradient computed in backward exists on its own only until it is added into
               its bucket (the largest such transient is counted). torch's plain DDP (`ddp_bucket_view=
               False`) keeps a second copy in .grad.
FSDP2          (`fsdp=True`, per process): every parameter, its gradient and every optimizer state whose first
               dimension is the parameter's rows is divided by rows as FSDP2 divides them (Shard(0):
               ceil(rows / world) rows on every rank, the padding included); other states (low-rank
               moments r x n, projections, scalars) are whole on every rank. Unsharded while in use: the
               root module (embeddings, final norm, lm_head; all-gathered for forward and kept through
               backward), a decoder layer and the next one prefetched (each its all-gather buffer and its
               copied-out parameters at the start of backward), the layer's unsharded
               gradients and their reduce-scatter input; at the end (the root resharded) the root's
               gradients and their reduce-scatter input. Accumulating, the loop reduce-scatters every
               micro-step (train/loop.py), so the earlier micro-steps' gradients are held as this rank's
               shards, and every backward is a synchronising one. CPU check (2 gloo ranks): within 5%,
               states exactly.
               Update scratch is that of the whole matrices (an upper bound for row-local updates).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from train.memory.meta import _bytes


def shard_numel(shape, world_size: int) -> int:
    """Numbers per rank of a tensor split by rows as FSDP2's Shard(0) does: ceil(rows / world) rows (padded)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def shard_rows(rows: int, world_size: int, rank: int = 0) -> int:
    """Rows of a Shard(0) DTensor on `rank`: torch chunks by ceil(rows / world), the last ranks get the rest."""
    chunk = math.ceil(rows / world_size)
    return max(0, min(chunk, rows - rank * chunk))


def sharded_state_bytes(optimizer: torch.optim.Optimizer, world_size: int, rank: int = 0) -> int:
    """`apollo.optimizer_state_bytes` of FSDP2 rank `rank` (0 holds the most), from the unsharded meta step's
    state: a state whose first dimension is its parameter's rows is split by rows (a Shard(0) DTensor: the
    moments, Muon's and SCALE's momentum, Adam-mini's per-row v); the rest (low-rank moments r x n, a stored
    projection, scalars such as step, limiter norms, per-head v) is whole on every rank. Equal to the bytes
    of 2-process FSDP2 runs for every optimizer that shards (tests/train/test_memory_planner.py)."""
    total = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                rows_split = (value.dim() >= 1 and param.dim() >= 1 and value.shape[0] == param.shape[0]
                              and key != "projection")
                numel = shard_rows(value.shape[0], world_size, rank) * math.prod(value.shape[1:]) if rows_split \
                    else value.numel()
                total += numel * value.element_size()
            elif isinstance(value, (int, float)):
                total += 8
    return total


def _fsdp_units(model: nn.Module) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """(root parameters, each decoder layer's parameters), as `train.distributed.shard_model` groups them."""
    layers = [list(layer.parameters()) for layer in model.model.layers]
    inside = {id(q) for layer in layers for q in layer}
    return [q for q in model.parameters() if id(q) not in inside], layers


def ddp_bucket_bytes(trainable: list[torch.Tensor]) -> int:
    """DDP's flat buckets: one copy of every float gradient that requires grad."""
    return sum(q.numel() * q.element_size() for q in trainable if q.requires_grad and q.is_floating_point())


def fsdp_terms(model: nn.Module, world_size: int, *, p: int, mixed_precision: bool) -> tuple[int, dict]:
    """(this rank's weight bytes, the unsharded sizes `fsdp_phases` adds): FSDP2 all-gathers (and computes
    gradients) in the compute dtype c and reduce-scatters them in the reduce dtype r."""
    c = 2 if mixed_precision else p
    r = 4 if mixed_precision else p
    root, layers = _fsdp_units(model)
    root_numel = sum(q.numel() for q in root)
    layer_numel = max((sum(q.numel() for q in layer) for layer in layers), default=0)
    sharded = sum(shard_numel(q.shape, world_size) * q.element_size() for q in model.parameters())
    weights = sharded + sum(_bytes(b) for b in model.buffers())
    return weights, {"world_size": world_size, "root": c * root_numel, "root_grad": (c + r) * root_numel,
                     "layer": c * layer_numel, "layer_grad": (c + r) * layer_numel,
                     "head": c * model.get_output_embeddings().weight.numel()}


def fsdp_phases(phases: dict[str, dict[str, int]], f: dict, *, head: int, after_head: int, own: int,
                accumulating: bool) -> None:
    """Add FSDP2's unsharded parameters and gradients (`fsdp_terms`' `f`) to the phases of a step, in place."""
    # accumulating, every micro-step reduce-scatters (train/loop.py): `held` is this rank's gradient shards,
    # and each backward is the synchronising one below
    held = phases["backward start"]["gradients"]
    # the layer being all-gathered and the prefetched one, each its all-gather buffer and its copy-out.
    # Counts calibrated on 2-process CPU runs (docs/memory.md), not traced
    phases["backward start"]["unsharded parameters"] = f["root"] + 4 * f["layer"]
    # a layer's unsharded gradients and their reduce-scatter input
    phases["lm_head gradient"] = {"activations": after_head, "gradients": held,
                                  "unsharded parameters": f["root"] + 2 * f["layer"],
                                  "unsharded gradients": f["head"] + f["layer_grad"]}
    # the root reshards before its reduce-scatter: its unsharded gradients and the reduce-scatter input
    phases["end of backward"]["unsharded gradients"] = f["root_grad"]
    phases["end of backward"]["gradients"] = own
