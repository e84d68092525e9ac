"""What a run will do, in a few lines, without doing it: the output of `python -m train ... --dry_run`.

Everything is computed on the meta device (no weights, no data): the param groups the optimizer's own routing
makes, the batch arithmetic, steps and tokens, the memory modes (--weight_quant, --layerwise) and the memory
estimate of train/memory/ for one process, with those modes and the --adapter (its frozen W0, factors and
their states): every term that adds up to the total, and
the phase of the step that sets the peak (DDP's buckets; FSDP2's per-rank shards under --fsdp).
"""
from __future__ import annotations

from apollo.routing import trainable
from train import adapters, relora
from train.adapters import apply_adapter
from train.build import build_optimizer
from train.config import TrainConfig, optimizer_options
from train.memory import estimate
from train.model import build_model, parameter_counts
from train.schedule import decay_steps


_GROUP_SETTINGS = ("rank", "proj", "proj_type", "update_proj_gap", "scale", "scale_type", "scale_front", "alpha",
                   "paper_form", "rule", "block", "kind", "momentum", "nesterov", "norm", "precondition_frequency")


def _optimizer_summary(config: TrainConfig, model) -> str:
    """The optimizer, its param groups as its own routing made them (tensors, values, lr) and the settings each
    group resolves to (presets filled in): SCALE's, Muon's or Adam-mini's groups, not APOLLO's split."""
    optimizer = build_optimizer(model, config)
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        settings = [f"{key} {group[key]:g}" if isinstance(group[key], float) else f"{key} {group[key]}"
                    for key in _GROUP_SETTINGS if key in group and group[key] is not None]
        params = [p for p in group["params"] if trainable(p)]  # a frozen W0 (--adapter lora) is never stepped
        frozen = len(group["params"]) - len(params)
        values = sum(p.numel() for p in params) / 1e6
        groups.append(f"{group.get('name', index)}: {len(params)} tensors ({values:.2f}M values"
                      + (f"; {frozen} frozen ones left alone" if frozen else "") + f"), lr {group['lr']:g}"
                      + (f", {', '.join(settings)}" if settings else ""))
    betas = f"betas ({config.beta1}, {config.beta2})"
    return f"{config.optimizer} ({type(optimizer).__name__}), {betas}, states {config.state_dtype}; " + "; ".join(groups)


def _memory_modes(config: TrainConfig) -> str:
    """int8 weights and layer-wise updates, as set."""
    modes = []
    if config.weight_quant:
        modes.append(f"int{config.weight_bits} attention/MLP weights in groups of {config.weight_group_size} "
                     f"({'stochastic' if config.stochastic_round else 'nearest'} rounding)")
    if config.layerwise:
        modes.append("layer-wise updates during backward")
    if config.fsdp:
        modes.append("FSDP2: weights, gradients and optimizer state sharded over the processes"
                     + (" (bfloat16 compute, float32 reduction)" if config.fsdp_mixed_precision else ""))
    return "; ".join(modes) or "none (full-precision weights, one optimizer step per update)"


def _wsd_decay(config: TrainConfig) -> str:
    """' (decay over the last D updates)' for --scheduler wsd, the restarts for cosine_restarts, else ''."""
    if config.scheduler == "cosine_restarts":
        return (f" (restarts every {config.cycle_length:,} updates, ramps of {config.restart_warmup_steps:,}, "
                f"{config.restart_variant} variant)")
    if config.scheduler != "wsd":
        return ""
    return f" (linear decay over the last {decay_steps(config.num_training_steps, config.decay_fraction):,} updates)"


def describe(config: TrainConfig, world_size: int) -> list[str]:
    """Lines that describe the resolved run for `world_size` processes."""
    model = build_model(config.model_config, dtype=config.dtype, device="meta")
    counts = parameter_counts(model)
    adapter_counts = apply_adapter(model, config)  # the optimizer below sees the factors, not the frozen W0
    tokens_per_update = config.total_batch_size * config.max_length
    memory = estimate(
        config.model_config, optimizer=config.optimizer, batch_size=config.batch_size, max_length=config.max_length,
        options=optimizer_options(config), activation_checkpointing=config.activation_checkpointing,
        dtype=config.dtype, state_dtype=config.state_dtype, packing=config.packing, weight_quant=config.weight_quant,
        weight_group_size=config.weight_group_size, weight_bits=config.weight_bits,
        stochastic_round=config.stochastic_round, layerwise=config.layerwise,
        # DDP's buckets, or FSDP2's shards: under HSDP each rank shards over its world / R shard group only
        world_size=1 if config.single_gpu else world_size // config.replicate_degree if config.fsdp else world_size,
        gradient_accumulation=config.gradient_accumulation, fsdp=config.fsdp,
        fsdp_mixed_precision=config.fsdp_mixed_precision, adapter=config,
    )
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return [
        f"dry run: {config.name} -> {config.save_dir}",
        f"model: {config.model_config}: {counts['total'] / 1e6:.1f}M parameters; {config.dtype}",
        f"optimizer: {_optimizer_summary(config, model)}",
        f"adapter: {adapters.describe(config, adapter_counts)}",
        *([f"relora: {relora.describe(config)}"] if config.relora is not None else []),
        f"memory modes: {_memory_modes(config)}",
        f"batch: {config.batch_size} sequences x {config.gradient_accumulation} accumulation x {processes} = "
        f"{config.total_batch_size} sequences x {config.max_length} tokens = {tokens_per_update:,} token slots per update",
        f"schedule: {config.num_training_steps:,} updates ({config.warmup_steps:,} warmup, {config.scheduler}"
        f"{_wsd_decay(config)} to {config.min_lr_ratio:g} x lr) = {config.num_training_steps * tokens_per_update / 1e9:.2f}B token slots; "
        f"eval every {config.eval_every:,}, save every {config.save_every:,}",
        f"memory per process (estimate, {config.dtype}, micro-batch {config.batch_size}"
        + (f", HSDP: {config.replicate_degree} replicas x {world_size // config.replicate_degree} shards"
           if config.fsdp and config.replicate_degree > 1 else
           f", FSDP2 shards over {world_size} processes" if config.fsdp else
           f", DDP over {world_size} processes" if world_size > 1 and not config.single_gpu else "")
        + f"; train.memory has the details): {memory.peak_line()}",
    ]
