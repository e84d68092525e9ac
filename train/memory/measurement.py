"""Memory measured on this CPU: the allocator's peak over real training steps, one process or several (gloo).

    python -m train.memory --model_config configs/llama_9m.json --optimizer apollo --rank 16 --device cpu --measure

What checks the estimate (tests/train/test_memory*.py, docs/memory.md): the same model and optimizer,
built for real on the CPU, stepped under torch's profiler.
"""
from __future__ import annotations

import torch

import apollo
from train.memory.meta import build, optimizer_for, resolve_state_dtype


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def live_bytes(*collections) -> int:
    """Bytes of the distinct storages behind the given tensors (what is alive before a step; a DTensor's
    local storage, FSDP2's padding included)."""
    storages = {}
    for tensors in collections:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t = _local(t)
                if t.device.type != "meta":
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _allocation_trace(prof) -> tuple[int, int]:
    """(peak, end) of bytes allocated by torch's CPU allocator during a profile, relative to its start.

    Every allocation event carries the allocator's running total of bytes allocated (and not yet
    freed) since memory profiling began; its maximum minus the total before the first event is the
    step's peak on top of what was already alive. Library-internal buffers (oneDNN/BLAS workspaces,
    gloo's) do not go through torch's allocator and are not seen.
    """
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        stack.extend(node.children)
    if not events:
        return 0, 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start, events[-1][1] - start


def _allocation_peak(prof) -> int:
    return _allocation_trace(prof)[0]


def _batch(vocab: int, batch_size: int, max_length: int, packing: bool, seed: int = 1):
    ids = torch.randint(2, vocab, (batch_size, max_length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if not packing:
        mask[0, max_length * 3 // 4:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def measure(config, *, optimizer: str = apollo.BASELINE, batch_size: int = 1, max_length: int = 256,
            rank: int | None = None,
            weight_quant: bool = False, weight_group_size: int = 128, stochastic_round: bool = False,
            layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "float32",
            state_dtype: str | None = None, packing: bool = False, steps: int = 2, gradient_accumulation: int = 1,
            options: dict | None = None, adapter=None) -> int:
    """Measured peak bytes of real training steps on the CPU: the largest over `steps` steps.

    Per step: bytes alive before it (weights, buffers, optimizer state, batch) + the allocator's peak
    during forward, backward (`gradient_accumulation` micro-steps), update and zero_grad
    (`_allocation_peak`). The first step creates the optimizer state and refreshes every projection
    (GaLore's SVD), later ones are steady-state. The batch is random tokens, the last quarter of the
    first sequence padded (as C4 documents shorter than T are).
    """
    from torch.profiler import ProfilerActivity, profile

    name = apollo.canonical_name(optimizer)
    state_dtype = resolve_state_dtype(name, state_dtype)
    torch.manual_seed(0)
    model = build(config, dtype=dtype, device="cpu", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  stochastic_round=stochastic_round, activation_checkpointing=activation_checkpointing, adapter=adapter)
    model.train()
    opt = optimizer_for(model, name, rank=rank, state_dtype=state_dtype, layerwise=layerwise, options=options)
    ids, mask, labels = _batch(model.config.vocab_size, batch_size, max_length, packing)

    peak = 0
    for _ in range(steps):
        before = live_bytes(model.parameters(), model.buffers(), (ids, mask, labels),
                            (v for state in opt.state.values() for v in state.values()))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(gradient_accumulation):
                (model(input_ids=ids, attention_mask=mask, labels=labels).loss / gradient_accumulation).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = max(peak, before + _allocation_peak(prof))
    return peak


def _distributed_worker(rank: int, init_file: str, world_size: int, config, kwargs: dict, results) -> None:
    """One gloo process of `measure_distributed`: its peak and its optimizer-state bytes."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from train.distributed import Distributed, shard_model, wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mode, accumulation, steps = kwargs.pop("mode"), kwargs.pop("gradient_accumulation"), kwargs.pop("steps")
        batch_size, max_length, packing = kwargs.pop("batch_size"), kwargs.pop("max_length"), kwargs.pop("packing")
        name, options = apollo.canonical_name(kwargs.pop("optimizer")), kwargs.pop("options")
        rank_option, state_dtype = kwargs.pop("rank"), resolve_state_dtype(name, kwargs.pop("state_dtype"))
        torch.manual_seed(0)
        model = build(config, device="cpu", weight_quant=False, weight_group_size=128, **kwargs)
        model.train()
        ctx = Distributed(rank, rank, world_size, torch.device("cpu"))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            if mode == "fsdp":
                wrapped = shard_model(model, ctx, mixed_precision=False)
            else:
                wrapped = wrap_model(model, ctx, bucket_view=mode == "ddp")
        # DDP's buckets; FSDP2's new shards are counted below as the parameters' storage (freeing the whole
        # tensors, allocated before the profile, is not seen). DDP's start-up broadcast frees its flat buffer
        # (one model size) when gloo lets go of it, which now and then is after the profile: that rank would
        # count it as kept. The buckets are the same on every rank, so the smallest reading is the one without
        # the buffer.
        kept = _allocation_trace(prof)[1] if mode != "fsdp" else 0
        kept_tensor = torch.tensor([kept], dtype=torch.int64)
        dist.all_reduce(kept_tensor, op=dist.ReduceOp.MIN)
        kept = int(kept_tensor.item())
        opt = optimizer_for(model, name, rank=rank_option, state_dtype=state_dtype, options=options)
        ids, mask, labels = _batch(model.config.vocab_size, batch_size, max_length, packing, seed=1 + rank)
        peak = 0
        for _ in range(steps):
            before = kept + live_bytes(model.parameters(), model.buffers(), (ids, mask, labels),
                                       (v for state in opt.state.values() for v in state.values()))
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                for micro in range(accumulation):
                    last = micro == accumulation - 1
                    # FSDP2 reduce-scatters every micro-step, as train/loop.py does
                    context = wrapped.no_sync() if mode != "fsdp" and not last else torch.enable_grad()
                    with context:
                        (wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss / accumulation).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            peak = max(peak, before + _allocation_peak(prof))
        results[rank] = (peak, apollo.optimizer_state_bytes(opt))
    finally:
        dist.destroy_process_group()


def measure_distributed(config, *, mode: str = "ddp", world_size: int = 2, optimizer: str = apollo.BASELINE,
                        batch_size: int = 1, max_length: int = 256, rank: int | None = None, dtype: str = "float32",
                        state_dtype: str | None = None, packing: bool = False, gradient_accumulation: int = 1,
                        activation_checkpointing: bool = False, steps: int = 2,
                        options: dict | None = None) -> list[tuple[int, int]]:
    """Per rank (peak bytes, optimizer-state bytes) of real steps under `world_size` gloo processes on the CPU.

    `mode`: "ddp" (the harness's `BucketViewDDP`), "ddp_copy" (torch's plain DDP) or "fsdp" (FSDP2,
    `train.distributed.shard_model`). Each rank counts what is alive before a step (weights or its shards,
    buffers, state, batch, DDP's buckets: what the wrapper kept allocated) + its allocator's peak during the
    step (`gradient_accumulation` micro-steps, DDP's under no_sync but the last; FSDP2 syncs every one).
    """
    import tempfile

    import torch.multiprocessing as mp

    if mode not in ("ddp", "ddp_copy", "fsdp"):
        raise ValueError(f"mode must be ddp, ddp_copy or fsdp, got {mode!r}")
    kwargs = dict(mode=mode, gradient_accumulation=gradient_accumulation, steps=steps, batch_size=batch_size,
                  max_length=max_length, packing=packing, optimizer=optimizer, options=options, rank=rank,
                  state_dtype=state_dtype, dtype=dtype, activation_checkpointing=activation_checkpointing)
    with tempfile.TemporaryDirectory() as folder:
        results = mp.Manager().dict()
        mp.spawn(_distributed_worker, args=(f"{folder}/init", world_size, config, kwargs, results), nprocs=world_size,
                 join=True)
        return [results[r] for r in range(world_size)]
