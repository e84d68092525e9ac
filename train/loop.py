"""The training loop: build the run, then one update after another in a fixed order.

Sections of `train`, top to bottom: seed -> model -> optimizer -> data -> logger -> resume -> loop.
Each pass of the loop: lr from the schedule -> eval / save when due -> accumulate the micro-batches
-> clip -> one health check (NaN/inf loss, stop signal) -> optimizer step -> zero_grad -> log.
The health check is the one host read per update: a small all-reduce of [loss, tokens, stop]; every
other metric (grad norm, ...) is read only at log points. After num_training_steps updates: a final
evaluation, a final checkpoint and a check that every replica holds the same weights.

Memory modes (train/build.py): --weight_quant stores attention/MLP weights as uint8 (their gradients
live in `float_grad`, which DDP does not see, so they are all-reduced here before the step);
--layerwise updates every parameter inside backward, so `optimizer.step()` only closes the update's
bookkeeping and the logged grad_norm is the one the hooks measured. The lr schedule is applied the same
way in both modes: every param group's lr is set before the update's forward pass.

Speed: every log carries tokens/s per process and, where the device's peak is known (--peak_tflops or
its name), MFU. --compile compiles each decoder layer (after activation checkpointing, before FSDP2/DDP);
graphs compiled during an update after the run's first are counted (compile/recompiles) and announced,
since a run that recompiles every update is slower than an eager one.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import apollo
from apollo import quant, sharded
from train.checkpoint import (CheckpointError, PendingCheckpoint, capture_rng, find_checkpoint, load_checkpoint,
                              prune_checkpoints, restore_rng, save_checkpoint)
from train import adapters
from train.adapters import apply_adapter
from train.build import build_optimizer, quantize
from train.config import TrainConfig
from train.data import build_train_loader
from train.distributed import (Distributed, StopSignal, all_gather_floats, all_reduce_sum, shard_model, unwrap,
                               wrap_model)
from train.evaluate import evaluate
from train.metrics import MetricsLogger, default_peak_tflops, device_name, speed_metrics
from train.model import build_model, compile_layers, compiled_graphs, flops_per_token, parameter_counts
from train.relora import build_relora
from train.schedule import lr_multiplier


class NonFiniteLossError(RuntimeError):
    """The loss of an update was NaN or inf (with --nan_policy stop)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at update {step}; lower --lr, set --grad_clipping, or pass --nan_policy skip")
        self.step = step


def seed_everything(seed: int) -> None:
    """The same seed on every rank, so every replica starts from the same weights."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def train(config: TrainConfig, ctx: Distributed, tokenizer: Any) -> int:
    """Run a resolved, checked config to the end (or to a stop signal); returns the exit code (0).

    Raises NonFiniteLossError when the loss goes NaN/inf and --nan_policy is stop.
    """
    run_dir = Path(config.save_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # -- model, optimizer, data ------------------------------------------------------------------
    seed_everything(config.seed)
    model = build_model(config.model_config, dtype=config.dtype, device=ctx.device,
                        activation_checkpointing=config.activation_checkpointing)
    counts = parameter_counts(model)  # before quantisation: the int8 layers are no longer nn.Linear
    adapter_counts = apply_adapter(model, config)  # --adapter: LoRA / Low-Rank factors, before the optimizer sees them
    # 6 FLOPs per trained value and token; a frozen W0 costs its forward and input gradient only (4)
    model_flops = (flops_per_token(model.config, config.max_length, counts["total"]) if config.adapter == "none" else
                   flops_per_token(model.config, config.max_length, adapter_counts["trainable"]) + 4 * adapter_counts["frozen"])
    if config.compile:  # torchtitan's order: activation checkpointing (build_model), compile, then FSDP2/DDP
        compile_layers(model)
    quantize(model, config)  # --weight_quant: uint8 attention/MLP weights, before DDP and the optimizer see them
    if config.fsdp:  # the optimizer must see the sharded (DTensor) parameters
        shard_model(model, ctx, mixed_precision=config.fsdp_mixed_precision, replicate_degree=config.replicate_degree)
    optimizer = build_optimizer(model, config)  # --layerwise: updates run from gradient hooks inside backward
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    relora = build_relora(model, optimizer, config)  # --relora: merges and moment pruning after some updates
    loader = build_train_loader(tokenizer=tokenizer, data_dir=config.data_dir, max_length=config.max_length,
                                batch_size=config.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                workers=config.workers, packing=config.packing, seed=config.data_seed,
                                data_format=config.data_format, vocab_size=model.config.vocab_size)
    logger = MetricsLogger(run_dir, config.to_dict(), wandb_mode=config.wandb, project=config.project, name=config.name,
                           entity=config.entity, total_steps=config.num_training_steps, enabled=ctx.is_main)
    logger.summarize({f"params/{key}": value for key, value in counts.items()})
    if config.adapter != "none":
        logger.summarize({f"params/adapter_{key}": value for key, value in adapter_counts.items()})
        logger.info(f"adapter: {adapters.describe(config, adapter_counts)}")
    peak = config.peak_tflops or default_peak_tflops(device_name(ctx.device))
    logger.summarize({"flops_per_token": model_flops, "peak_tflops": peak})
    if peak is None:
        logger.info(f"MFU not logged: no known peak for device '{device_name(ctx.device)}'; give it with --peak_tflops")

    # -- resume: weights, optimizer, counters, data position; the RNG once the loop has started the loader
    state = {"step": 0, "tokens_seen": 0, "last_eval_step": -1, "skipped_updates": 0}
    saved_rng = None
    if config.continue_from:
        checkpoint = find_checkpoint(config.continue_from)
        trainer_state, rank_state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, rank=ctx.rank)
        state.update(trainer_state["counters"])
        if relora is not None:
            if "relora" not in trainer_state:
                raise CheckpointError(f"{checkpoint}: holds no ReLoRA state (saved without --relora); it cannot resume "
                                      "a --relora run")
            relora.load_state_dict(trainer_state["relora"])
        loader.load_state_dict(rank_state["data"])
        saved_rng = rank_state["rng"]  # restored once the loader has started (below): it draws from torch's RNG
        logger.info(f"resumed from {checkpoint} at update {state['step']}")
    start_step = state["step"]
    logger.bar.update(start_step)
    logger.info(f"{config.optimizer}: {counts['total'] / 1e6:.2f}M parameters (its param groups: the optimizer's log); "
                f"{config.num_training_steps} updates of {config.total_batch_size} x {config.max_length} tokens "
                f"({config.batch_size} x {config.gradient_accumulation} accumulation x {ctx.world_size} process"
                f"{'es' if ctx.world_size > 1 else ''}); "
                f"run folder {run_dir}")

    pending: list[PendingCheckpoint] = []  # --async_save: the save whose shards are still being written

    def finish_saving() -> None:
        """Commit the asynchronous save in flight (every rank), then prune."""
        while pending:
            pending.pop().wait()
            prune()

    def prune() -> None:
        if config.keep_last and ctx.is_main:  # only now that the new checkpoint is complete
            for path in prune_checkpoints(run_dir, config.keep_last):
                logger.info(f"deleted {path} (--keep_last {config.keep_last})")

    def save(step: int, *, last: bool = False) -> None:
        finish_saving()
        saved = save_checkpoint(run_dir, step, model=model, optimizer=optimizer, rank=ctx.rank, sharded=config.fsdp,
                                asynchronous=config.async_save and not last, config=config.to_dict(),
                                trainer_state={"counters": dict(state), "world_size": ctx.world_size,
                                               "schedule": {"scheduler": config.scheduler, "base_lrs": base_lrs,
                                                            "warmup_steps": config.warmup_steps,
                                                            "num_training_steps": config.num_training_steps,
                                                            "min_lr_ratio": config.min_lr_ratio,
                                                            "decay_fraction": config.decay_fraction,
                                                            "cycle_length": config.cycle_length,
                                                            "restart_warmup_steps": config.restart_warmup_steps,
                                                            "adjust_step": config.adjust_step,
                                                            "restart_variant": config.restart_variant},
                                               **({"relora": relora.state_dict()} if relora is not None else {})},
                                rank_state={"data": loader.state_dict(), "rng": capture_rng()})
        if isinstance(saved, PendingCheckpoint):  # committed at the next save or at the end
            pending.append(saved)
        else:
            prune()

    def run_eval(step: int) -> None:
        result = evaluate(model, tokenizer=tokenizer, data_dir=config.data_dir, max_length=config.max_length,
                          batch_size=config.eval_batch_size or config.batch_size, eval_tokens=config.eval_tokens,
                          device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                          lockstep=config.fsdp, data_format=config.data_format)  # restores train mode
        state["last_eval_step"] = step
        logger.log({"eval/loss": result.loss, "eval/perplexity": result.perplexity, "eval/bits_per_byte": result.bits_per_byte,
                    "eval/tokens": result.tokens, "eval/text_bytes": result.text_bytes,
                    **({"eval/unk_mapped_tokens": result.unk_mapped} if result.unk_mapped else {})}, step)
        logger.info(f"update {step}: eval loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
                    f"bits per byte {result.bits_per_byte:.4f}")

    # -- the loop --------------------------------------------------------------------------------
    ddp_model = model if config.fsdp else wrap_model(model, ctx, single_gpu=config.single_gpu)
    ddp_model.train()
    # the loader draws from torch's RNG when it starts (its iterator and first batch); a fresh run did that before
    # update 1, so a resumed run restores the saved RNG only after it: dropout (--adapter) then draws the same masks
    batches = iter(loader)
    if saved_rng is not None:
        if start_step < config.num_training_steps:  # a finished run reads no batch
            batches = itertools.chain([next(batches)], batches)
        restore_rng(saved_rng)
    stop = StopSignal()
    step, accum = start_step, config.gradient_accumulation
    window_seconds, window_tokens, exit_code = 0.0, 0, 1  # throughput counts update time only, not eval/save
    window_positions, recompiles, window_recompiles = 0, 0, 0
    positions_per_update = config.total_batch_size * config.max_length  # computed, padding included (MFU)
    try:
        while step < config.num_training_steps:
            multiplier = lr_multiplier(step, num_training_steps=config.num_training_steps, warmup_steps=config.warmup_steps,
                                       scheduler=config.scheduler, min_lr_ratio=config.min_lr_ratio,
                                       decay_fraction=config.decay_fraction, cycle_length=config.cycle_length,
                                       restart_warmup_steps=config.restart_warmup_steps or 0,
                                       adjust_step=config.adjust_step, restart_variant=config.restart_variant)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * multiplier

            if step > 0 and step % config.eval_every == 0 and state["last_eval_step"] != step:
                run_eval(step)
            if step > start_step and step % config.save_every == 0:
                save(step)

            update_start, graphs_before = time.perf_counter(), compiled_graphs()
            loss_sum, tokens = torch.zeros((), device=ctx.device, dtype=torch.float64), 0
            for micro_step in range(accum):
                batch = next(batches)
                tokens += int(batch["attention_mask"].sum())
                batch = {key: value.to(ctx.device, non_blocking=True) for key, value in batch.items()}
                # DDP all-reduces once per update (no_sync before); FSDP2 reduce-scatters every micro-step, so the
                # gradients accumulate as this rank's shards instead of whole tensors (sync stays on: with it
                # off at the last micro-step, .grad would stay None and the optimizer skip every parameter)
                syncing = micro_step == accum - 1 or ddp_model is model
                if config.fsdp and config.replicate_degree > 1:  # HSDP: all-reduce across replicas once per update
                    model.set_requires_all_reduce(micro_step == accum - 1)
                with nullcontext() if syncing else ddp_model.no_sync():  # all-reduce grads once per update
                    loss = ddp_model(**batch).loss / accum
                    loss.backward()
                loss_sum += loss.detach()

            if config.weight_quant:
                quant.all_reduce_quantized_grads(model)  # DDP averages .grad only, not int8 weights' float_grad
            log_now = (step + 1) % config.log_every == 0 or step + 1 == config.num_training_steps or step == start_step
            grad_norm = _clip_or_measure(model, config, measure=log_now)

            health = torch.tensor([0.0, tokens, float(stop.requested)], dtype=torch.float64, device=ctx.device)
            health[0] = loss_sum
            loss_total, tokens_total, stops = all_reduce_sum(health).tolist()
            loss_value = loss_total / ctx.world_size
            if math.isfinite(loss_value):
                optimizer.step()
                if config.layerwise:  # the gradients were freed in backward; the hooks kept their norm
                    grad_norm = optimizer.last_grad_norm
            elif config.nan_policy == "stop":
                raise NonFiniteLossError(step + 1, loss_value)
            else:
                state["skipped_updates"] += 1
                logger.info(f"update {step + 1}: loss is {loss_value}; skipped (--nan_policy skip)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            if relora is not None:  # after update kT_m + 1 / kC + 1: merge and re-init, prune the factors' moments
                for line in relora.after_update(step):
                    logger.info(line)
            state["tokens_seen"] += int(tokens_total)
            window_tokens += int(tokens_total)
            window_positions += positions_per_update
            window_seconds += time.perf_counter() - update_start
            new_graphs = compiled_graphs() - graphs_before
            if step == start_step + 1:
                first_update = {"compile/first_update_seconds": window_seconds, "compile/graphs": new_graphs}
            elif config.compile and new_graphs:  # guards failed or shapes changed: dynamo compiled again
                recompiles, window_recompiles = recompiles + new_graphs, window_recompiles + new_graphs

            if log_now:
                metrics = {"loss": loss_value, "lr": config.lr * multiplier, "tokens_seen": state["tokens_seen"],
                           "throughput_tokens": window_tokens / max(window_seconds, 1e-9),
                           "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           **speed_metrics(tokens=window_tokens, positions=window_positions, seconds=window_seconds,
                                           world_size=ctx.world_size, flops_per_token=model_flops, peak_tflops=peak)}
                if config.compile:
                    metrics["compile/recompiles"] = recompiles
                    if step == start_step + 1:  # the first update's time is mostly compiling
                        metrics.update(first_update)
                    if window_recompiles:
                        logger.info(f"update {step}: {window_recompiles} graph(s) recompiled in the last "
                                    f"{config.log_every} update(s), {recompiles} since the first update "
                                    f"(shapes or guards changed; a recompile every update runs slower than eager)")
                if state["skipped_updates"]:
                    metrics["skipped_updates"] = state["skipped_updates"]
                if loader.unk_mapped:  # this rank's ids >= vocab_size read as <unk> so far (train.data)
                    metrics["data/unk_mapped_tokens"] = loader.unk_mapped
                if step == start_step + 1:
                    metrics["optimizer_state_bytes"] = apollo.optimizer_state_bytes(optimizer)
                    logger.summarize({"optimizer_state_bytes": metrics["optimizer_state_bytes"]})
                logger.log(metrics, step)
                logger.progress(1, loss=loss_value, lr=metrics["lr"], tok_s=metrics["throughput_tokens"])
                window_seconds, window_tokens, window_positions, window_recompiles = 0.0, 0, 0, 0
            else:
                logger.progress(1)

            if stops and step < config.num_training_steps:
                save(step, last=True)
                logger.info(f"stop signal: saved update {step} to {run_dir}; resume with --continue_from {run_dir}")
                exit_code = 0
                return exit_code

        if state["last_eval_step"] != step:
            run_eval(step)
        if step > start_step:
            save(step, last=True)
        finish_saving()
        # replicas must agree (DDP); sharded runs hold different rows on each rank by design
        checksums = all_gather_floats(_checksum(model), ctx.device)  # [[sum, sum of squares] of each rank]
        identical = config.fsdp or all(value == checksums[0] for value in checksums)
        logger.log({"param_checksums": checksums, "replicas_identical": identical}, step)
        if not identical:
            logger.info(f"warning: replicas differ at the end of the run: parameter checksums {checksums}")
        exit_code = 0
        return exit_code
    finally:
        stop.close()
        logger.close(exit_code)


def _clip_or_measure(model: torch.nn.Module, config: TrainConfig, *, measure: bool) -> torch.Tensor | None:
    """Clip the global gradient norm (--grad_clipping), or only measure it when `measure`; int8 weights' float_grad included.

    None with --layerwise: the gradients are gone by now (LayerwiseOptimizer.last_grad_norm has their norm).
    """
    if config.layerwise:
        return None
    if config.grad_clipping > 0:
        if config.weight_quant:
            return quant.clip_grad_norm_(model, config.grad_clipping)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clipping)
    else:
        norm = torch.nn.utils.get_total_norm(quant.gradients(model)) if measure else None
    return norm.full_tensor() if sharded.is_dtensor(norm) else norm  # FSDP2: a replicated DTensor


def _checksum(model: torch.nn.Module) -> list[float]:
    """[sum, sum of squares] of every parameter in float64: equal on every rank iff replicas agree (in practice)."""
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for param in model.parameters():  # one float64 copy at a time (this rank's shard under --fsdp)
            value = sharded.local(param.detach()).double()
            total, squares = total + value.sum(), squares + (value * value).sum()
    return [float(total), float(squares)]
