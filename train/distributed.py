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
        timeout = timedelta(minutes=timeout_minutes)
        store = attempt_store(world_size, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                                **({"store": store, "rank": rank, "world_size": world_size} if store else {}))
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun's elastic agent: its TCPStore, seen through a prefix of this restart attempt; None otherwise.

    torchrun's workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE), and the rendezvous
    keeps that server across `--max_restarts` restarts (dynamic_rendezvous.py's shared TCP store
    server, created once), while `init_process_group("env://")` uses it without a prefix
    (rendezvous.py assumes "a new TCPStore for every retry"). The process group's keys of the killed attempt
    (each rank's gloo address) are then still there: a restarted rank reads the dead rank's old address
    ("Connection refused") or waits on a key that is never rewritten. With the keys prefixed by
    TORCHELASTIC_RESTART_COUNT every attempt starts from an empty namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"attempt_{attempt}", store)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _mean_all_reduce(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP comm hook (`state`: the process group, `bucket`: a dist.GradBucket): multiply the bucket by 1/world, then sum it over the ranks.

    The arithmetic of DDP's own path (the reducer multiplies each gradient by 1/world as it copies it
    into the bucket; with its gradients already in the bucket it would divide by world instead, which
    rounds differently when world is not a power of two).
    """
    group = state if state is not None else dist.group.WORLD
    buffer = bucket.buffer()
    buffer.mul_(1.0 / dist.get_world_size(group))
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class BucketViewDDP(DistributedDataParallel):
    """DistributedDataParallel whose gradients are views into its all-reduce buckets: one gradient copy, not two.

    Plain DDP keeps every gradient twice, in ``param.grad`` and in its flat buckets.
    ``gradient_as_bucket_view=True`` alone removes the copy only while ``.grad`` stays a bucket view;
    the loop's ``zero_grad(set_to_none=True)`` drops the views, and the next backward (under ``no_sync``
    for every accumulation micro-step but the last) allocates fresh gradients beside the buckets again.
    This wrapper keeps each parameter's bucket view and, before a forward pass with autograd on,
    points ``param.grad`` back at it (zeroed) where the optimizer set it to None. Backward then
    accumulates into the buckets in place, under ``no_sync`` too, and the synchronising backward
    all-reduces them where they are. Outside forward/backward the optimizer sees what it saw before:
    ``.grad`` is None after ``zero_grad(set_to_none=True)``.

    Bit-identical to plain DDP (tests/train/test_ddp.py): 0 + g is g; accumulation adds in place as
    autograd does; `_mean_all_reduce` multiplies by 1/world as the reducer does. DDP rebuilds its
    buckets once (at the forward after the first synchronising backward), moving the gradients into the
    new buckets; the views are taken again right after that, before the forward allocates anything.
    """

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if any(p.grad is not None for p in params):
            raise ValueError("BucketViewDDP: wrap the model before its first backward (gradients exist)")
        for p in params:  # a stride-0 zero "gradient" (one element of memory): DDP points .grad at its bucket view
            p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
        try:
            super().__init__(module, gradient_as_bucket_view=True, **kwargs)
            self._grad_views = {p: p.grad for p in params}
        finally:
            for p in params:
                p.grad = None
        self.register_comm_hook(self.process_group, _mean_all_reduce)

    def _attach_grad_views(self) -> None:
        for param, view in self._grad_views.items():
            if param.grad is None:
                param.grad = view.zero_()

    def _pre_forward(self, *inputs: Any, **kwargs: Any):
        grad_enabled = torch.is_grad_enabled()
        if grad_enabled:
            self._attach_grad_views()
        result = super()._pre_forward(*inputs, **kwargs)  # may rebuild the buckets (once): .grad moves with them
        if grad_enabled:
            self._grad_views = {p: p.grad if p.grad is not None else view for p, view in self._grad_views.items()}
        return result


def wrap_model(model: nn.Module, ctx: Distributed, *, single_gpu: bool = False, bucket_view: bool = True) -> nn.Module:
    """DistributedDataParallel around `model` when several processes train it; the model itself otherwise.

    `bucket_view` (default): `BucketViewDDP`, the gradients live in DDP's buckets (one copy);
    False: torch's plain DDP (a second, flat copy of every gradient in its buckets).
    """
    if not ctx.is_distributed or single_gpu:
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return (BucketViewDDP if bucket_view else DistributedDataParallel)(model, device_ids=device_ids)


def shard_model(model: nn.Module, ctx: Distributed, *, mixed_precision: bool = False,
                replicate_degree: int = 1) -> nn.Module:
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, lm_head), sharded by rows
    over all processes (`torch.distributed.fsdp.fully_shard`); the parameters become DTensors.

    `mixed_precision`: compute in bfloat16, reduce gradients in float32 (the sharded weights keep their dtype).
    `replicate_degree` R > 1: HSDP on a 2-D mesh ("replicate", "shard") of R x world/R, consecutive ranks
    in one replica (one node under torchrun): parameters are (Replicate(), Shard(0)) DTensors, gradients
    are reduce-scattered inside a replica and all-reduced across replicas.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if replicate_degree > 1:
        mesh = init_device_mesh(ctx.device.type, (replicate_degree, ctx.world_size // replicate_degree),
                                mesh_dim_names=("replicate", "shard"))
    else:
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


def world_size() -> int:
    """Processes in the default group: 1 without one (a plain process, or before `setup`)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order; [value] with one process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


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
