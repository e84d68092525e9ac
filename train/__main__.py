"""`python -m train ...` and `torchrun --nproc_per_node N -m train ...`: flags -> checks -> the loop.

Every bad flag or combination fails here, before the model is built or training data is read, with
exit code 2 and one line on stderr that says what to change. A NaN/inf loss (with --nan_policy stop)
exits 1 naming the update; a finished run, and a run stopped by SIGTERM/SIGINT after saving, exit 0.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from train.build import build_optimizer, quantize
from train.checkpoint import checkpoint_world_size, find_checkpoint
from train.config import ConfigError, TrainConfig, parse_args, resolve
from train.distributed import broadcast_object, env_world, setup, teardown

# Settings that may change between a run and its resumption without a warning.
_RESUMABLE_CHANGES = {"continue_from", "save_dir", "name", "project", "entity", "wandb", "workers", "eval_every",
                      "save_every", "log_every", "eval_tokens", "eval_batch_size", "nan_policy"}
# Settings that decide the layout of a checkpoint's weights and optimizer state: a resume must keep them.
_LAYOUT_SETTINGS = ("weight_quant", "weight_group_size", "layerwise")
_DEFAULTS = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig) if spec.default is not dataclasses.MISSING}


def preflight(config: TrainConfig, world_size: int) -> tuple[Any, list[str]]:
    """The checks that read files, cheap ones first; returns (tokenizer, warnings). Raises ConfigError."""
    from train.data import check_data_source, load_tokenizer
    from train.model import build_model, load_llama_config

    if not Path(config.model_config).is_file():
        raise ConfigError(f"--model_config {config.model_config}: no such file (try configs/llama_60m.json)")
    try:
        llama_config = load_llama_config(config.model_config)
    except ValueError as error:
        raise ConfigError(f"--model_config: {error}") from None

    warnings: list[str] = []
    if config.continue_from is not None:
        try:
            checkpoint = find_checkpoint(config.continue_from)
        except ValueError as error:
            raise ConfigError(f"--continue_from: {error}") from None
        saved_ranks = checkpoint_world_size(checkpoint)
        if saved_ranks != world_size:
            raise ConfigError(f"--continue_from {checkpoint} was written by {saved_ranks} processes; "
                              f"resume it with {saved_ranks}, not {world_size}")
        saved = json.loads((checkpoint / "config.json").read_text())
        saved = {**_DEFAULTS, **saved}  # a flag newer than the checkpoint had its default there
        layout_keys = _LAYOUT_SETTINGS if config.weight_quant else ("weight_quant", "layerwise")
        for key in layout_keys:  # they change what model.safetensors / optimizer.pt hold
            if saved.get(key) != getattr(config, key):
                raise ConfigError(f"--continue_from {checkpoint} was saved with --{key} {saved.get(key)}; resume it with "
                                  f"the same setting (got {getattr(config, key)})")
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in config.to_dict().items()
                   if key not in _RESUMABLE_CHANGES and saved.get(key) != value]
        if changed:
            warnings.append(f"resuming {checkpoint} with changed settings: {', '.join(changed)}")

    try:
        check_data_source(config.data_dir)
    except ValueError as error:
        raise ConfigError(f"--data_dir: {error}") from None

    meta_model = build_model(llama_config, dtype=config.dtype, device="meta")
    try:  # int8 groups must divide every attention/MLP weight
        quantize(meta_model, config)
    except ValueError as error:
        raise ConfigError(f"--weight_group_size {config.weight_group_size}: {error}") from None
    try:  # the optimizer's own checks (rank, scale, ...) on a weightless copy of the model
        build_optimizer(meta_model, config)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--optimizer {config.optimizer}: {error}") from None

    if config.wandb == "online" and not config.dry_run:
        import wandb
        if not wandb.login(prompt=False, verify=False):
            raise ConfigError("--wandb online needs a W&B login: run `wandb login` or set WANDB_API_KEY, "
                              "or pass --wandb offline")

    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except ValueError as error:
        raise ConfigError(f"--tokenizer: {error}") from None
    return tokenizer, warnings


def main(argv: list[str] | None = None) -> int:
    """Parse, check, train; returns the process exit code."""
    rank, _, world_size = env_world()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
    try:
        config, warnings = resolve(parse_args(argv), world_size)
        tokenizer, more_warnings = preflight(config, world_size)
    except ConfigError as error:
        say(f"error: {error}")
        return 2
    for warning in warnings + more_warnings:
        say(f"warning: {warning}")
    if config.dry_run:  # before any process group: a launcher may set WORLD_SIZE for a single dry-run process
        from train.plan import describe

        if rank == 0:
            print("\n".join(describe(config, world_size)), flush=True)
        return 0

    from train.loop import NonFiniteLossError, train

    ctx = setup()
    try:
        # Every rank trains into rank 0's folder (a default save_dir holds a timestamp).
        save_dir, name = broadcast_object((config.save_dir, config.name))
        return train(dataclasses.replace(config, save_dir=save_dir, name=name), ctx, tokenizer)
    except NonFiniteLossError as error:
        say(f"error: {error}")
        return 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
