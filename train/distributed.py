"""Processes and devices: torchrun's environment, the process group, DDP, collectives, stop signals.

A single process (`python -m train`) and torchrun (`torchrun --nproc_per_node N -m train`) run the
same code: with WORLD_SIZE > 1 the process group is initialised (nccl on GPUs, gloo on CPU) and the
collectives below reduce across ranks; with one process they do nothing.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: its rank among world_size processes and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, prints and writes shared files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def setup(timeout_minutes: float = 30.0) -> Distributed:
    """Pick the device and, under torchrun with several processes, join the process group."""
    rank, local_rank, world_size = env_world()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Distributed, *, single_gpu: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when several processes train it; the model itself otherwise."""
    if not ctx.is_distributed or single_gpu:
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_model(model: nn.Module, ctx: Distributed, *, mixed_precision: bool = False) -> nn.Module:
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, lm_head), sharded by rows
    over all processes (`torch.distributed.fsdp.fully_shard`); the parameters become DTensors.

    `mixed_precision`: compute in bfloat16, reduce gradients in float32 (the sharded weights keep their dtype).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op with one process) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's list of floats (float64), in rank order; [values] with one process."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [t.tolist() for t in gathered]


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. a save_dir that holds a timestamp)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StopSignal:
    """SIGTERM/SIGINT set a flag instead of killing the process, so the loop can finish the update and save.

    A second signal of the same kind restores the default behaviour (a second Ctrl-C interrupts at once).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous[signum])

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
