"""The checks that read files, run before anything is created: every problem is one ConfigError line (exit 2).

`preflight(config, world_size)` runs after `train.config.resolve` (which checks every value by its
field's domain) and before the run folder, wandb or any process group exist; it creates nothing. In
order, cheap first:
  0. the device mesh: --replicate_degree divides the processes (HSDP needs --fsdp), --async_save needs --fsdp;
  1. the save folder: creatable and writable; no checkpoints of another run in it (a new run into a
     folder with checkpoints under --resume never, or a resume into a folder holding checkpoints newer
     than the one resumed; --resume auto has already chosen the newest of this run, train/resume_check.py);
  2. the model config's contents: positive integer sizes, hidden size divisible by the heads, kv heads
     dividing the heads, an even head dimension, token ids inside the vocabulary, a known activation,
     positive norm epsilon and rope theta, `max_position_embeddings` >= --max_length; then whatever
     transformers itself rejects, as one line naming the file and the field;
  3. --continue_from: the newest complete checkpoint (damaged newer ones are named in a warning), the
     same number of processes, the same settings (train/resume_check.py);
  4. the data: both kinds of shards present, every json shard a readable gzip file whose first record
     is a json object with a string `text` field (the file is named); a token folder's own checks;
  5. the model, int8 quantisation and the optimizer built on the meta device (the optimizer's own
     checks: rank, ...), and the checkpoint's tensor shapes and optimizer groups against them;
  6. the wandb login (online mode);
  7. the tokenizer: it loads, has a pad token, and its ids fit the embedding.
Every rank runs the same checks on the same files, so every rank stops alike.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from train.adapters import apply_adapter
from train.relora import ReLoRAError, check_meta_states
from train.build import build_optimizer, quantize
from train.checkpoint import (CheckpointError, check_fits, checkpoint_folders, checkpoint_world_size, damage,
                              select_checkpoint, step_of)
from train.config import ConfigError, TrainConfig
from train.resume_check import check_resume

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "head_dim")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_LEGACY_KEYS = {"rope_theta", "rope_scaling", "torch_dtype", "partial_rotary_factor"}  # still read by LlamaConfig


def preflight(config: TrainConfig, world_size: int) -> tuple[TrainConfig, Any, list[str]]:
    """Check everything that needs a file; returns (config, tokenizer, warnings). Raises ConfigError.

    The returned config has --continue_from narrowed to the exact checkpoint folder that will be resumed.
    """
    from train.data import load_tokenizer
    from train.model import build_model

    warnings: list[str] = []
    check_mesh(config, world_size)
    check_save_dir(config.save_dir)
    llama_config, more = check_model_config(config.model_config, max_length=config.max_length)
    warnings += more

    checkpoint, step = None, None
    if config.continue_from is not None:
        checkpoint, step, more = check_checkpoint(config, world_size)
        warnings += more
        config = dataclasses.replace(config, continue_from=str(checkpoint))
    check_run_history(config.save_dir, step)
    check_data(config.data_dir, config.data_format)

    meta_model = build_model(llama_config, dtype=config.dtype, device="meta")
    try:  # --adapter: the rank below min(m, n) of every target, and the names a checkpoint must hold
        apply_adapter(meta_model, config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:  # int8 groups must divide every attention/MLP weight
        quantize(meta_model, config)
    except ValueError as error:
        raise ConfigError(f"--weight_group_size {config.weight_group_size}: {error}") from None
    try:  # the optimizer's own checks (rank, scale, ...) on a weightless copy of the model
        meta_optimizer = build_optimizer(meta_model, config)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--optimizer {config.optimizer}: {error}") from None
    if config.relora is not None:  # ReLoRA prunes Adam's moments: a meta step shows what the optimizer keeps
        try:
            check_meta_states(meta_model, meta_optimizer)
        except ReLoRAError as error:
            raise ConfigError(str(error)) from None
    if checkpoint is not None:
        try:
            check_fits(checkpoint, meta_model, meta_optimizer)
        except CheckpointError as error:
            raise ConfigError(f"--continue_from: {error}") from None

    if config.wandb == "online" and not config.dry_run:
        import wandb
        if not wandb.login(prompt=False, verify=False):
            raise ConfigError("--wandb online needs a W&B login: run `wandb login` or set WANDB_API_KEY, "
                              "or pass --wandb offline")

    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except ValueError as error:
        raise ConfigError(f"--tokenizer: {error}") from None
    warnings += check_tokenizer(tokenizer, config.tokenizer, vocab_size=llama_config.vocab_size,
                                model_config=config.model_config)
    return config, tokenizer, warnings


# ----------------------------------------------------------------------------- the device mesh


def check_mesh(config: TrainConfig, world_size: int) -> None:
    """--replicate_degree R (HSDP): with --fsdp, R dividing the world size into replicas of at least 2 processes;
    --async_save: with --fsdp."""
    if config.async_save and not config.fsdp:
        raise ConfigError("--async_save writes torch.distributed.checkpoint shards in the background: it needs --fsdp")
    degree = config.replicate_degree
    if degree == 1:
        return
    if not config.fsdp:
        raise ConfigError(f"--replicate_degree {degree} builds an HSDP mesh for --fsdp; add --fsdp (DDP replicates "
                          "every process already)")
    if world_size % degree or world_size // degree < 2:
        raise ConfigError(f"--replicate_degree {degree} must divide the {world_size} processes into replicas of at least "
                          f"2 (the shard dimension); e.g. the number of nodes")


# ----------------------------------------------------------------------------- the run folder


def check_save_dir(save_dir: str) -> None:
    """The run folder exists as a writable folder, or can be created (its nearest existing parent is one)."""
    path = Path(save_dir)
    existing = next(p for p in [path, *path.parents] if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ConfigError(f"--save_dir {save_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save_dir {save_dir}: {existing} is not writable")


def check_run_history(save_dir: str, resumed_step: int | None) -> None:
    """A run folder holds one run: no complete checkpoints in it for a new run, none newer than the resumed one."""
    complete = [path for path in checkpoint_folders(save_dir) if damage(path) is None]
    if resumed_step is None and complete:
        raise ConfigError(f"--save_dir {save_dir} already holds checkpoints of a run (newest {complete[-1].name}): "
                          f"resume it with --continue_from {save_dir} (or --resume auto, the default), or choose another --save_dir")
    newer = [path.name for path in complete if resumed_step is not None and step_of(path) > resumed_step]
    if newer:
        raise ConfigError(f"--save_dir {save_dir} holds {', '.join(newer)}, newer than the checkpoint resumed (update "
                          f"{resumed_step}); the resumed run would mix with them: choose another --save_dir")


# ----------------------------------------------------------------------------- the model config


def check_model_config(path: str, *, max_length: int) -> tuple[Any, list[str]]:
    """The LlamaConfig of `path` after checking its contents; returns (config, warnings). Raises ConfigError."""
    from transformers import LlamaConfig
    from transformers.activations import ACT2FN

    from train.model import load_llama_config

    file = Path(path)
    if not file.is_file():
        what = "a folder, not a json file" if file.is_dir() else "no such file (try configs/llama_60m.json)"
        raise ConfigError(f"--model_config {path}: {what}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--model_config {path}: cannot read a json file ({error})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"--model_config {path}: not a llama config (model_type is {found!r}, expected 'llama')")

    def bad(message: str) -> ConfigError:
        return ConfigError(f"--model_config {path}: {message}")

    defaults = LlamaConfig().to_dict()
    merged = {**defaults, **raw}
    for name in _SIZES:
        value = merged.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise bad(f"{name} must be a positive integer, got {value!r}")
    heads, kv_heads = merged["num_attention_heads"], merged.get("num_key_value_heads") or merged["num_attention_heads"]
    if heads % kv_heads:
        raise bad(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = raw.get("head_dim")  # LlamaConfig's default is hidden_size // num_attention_heads
    if head_dim is None:
        if merged["hidden_size"] % heads:
            raise bad(f"hidden_size {merged['hidden_size']} is not divisible by num_attention_heads {heads}")
        head_dim = merged["hidden_size"] // heads
    if head_dim % 2:
        raise bad(f"the head dimension {head_dim} is odd; rotary position embeddings need an even one")
    for name, zero_allowed in (("rms_norm_eps", False), ("initializer_range", True), ("rope_theta", False)):
        value = merged.get(name)
        number = type(value) in (int, float) and math.isfinite(value)
        if value is not None and not (number and (value > 0 or (zero_allowed and value == 0))):
            raise bad(f"{name} must be a finite number {'>=' if zero_allowed else '>'} 0, got {value!r}")
    if merged.get("hidden_act") not in ACT2FN:
        raise bad(f"hidden_act {merged.get('hidden_act')!r} is not an activation transformers knows (e.g. 'silu')")
    vocab = merged["vocab_size"]
    for name in _TOKEN_IDS:
        value = merged.get(name)
        for token in value if isinstance(value, list) else [value]:
            if token is not None and (type(token) is not int or not 0 <= token < vocab):
                raise bad(f"{name} {token!r} is not a token id of the vocabulary (0 .. {vocab - 1})")
    try:
        llama_config = load_llama_config(file)
    except Exception as error:  # transformers' validators raise several types; each is one line for the user
        message = "; ".join(line.strip().rstrip(":") for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise bad(f"rejected by transformers: {message.removeprefix(f'model config {file}: ')}") from None
    if llama_config.max_position_embeddings < max_length:
        raise ConfigError(f"--max_length {max_length} exceeds max_position_embeddings "
                          f"{llama_config.max_position_embeddings} of --model_config {path}")
    unknown = sorted(set(raw) - set(defaults) - _LEGACY_KEYS)
    warnings = [f"--model_config {path}: unknown keys {', '.join(unknown)} (LlamaConfig ignores them; a typo?)"] if unknown else []
    return llama_config, warnings


# ----------------------------------------------------------------------------- the checkpoint


def check_checkpoint(config: TrainConfig, world_size: int) -> tuple[Path, int, list[str]]:
    """(checkpoint folder, its update, warnings) for --continue_from; ConfigError if it cannot be resumed here."""
    try:
        checkpoint, skipped = select_checkpoint(config.continue_from)
    except CheckpointError as error:
        raise ConfigError(f"--continue_from: {error}") from None
    warnings = [f"skipping damaged checkpoint: {problem}" for problem in skipped]
    if not (checkpoint / "manifest.json").exists():
        warnings.append(f"{checkpoint} has no manifest.json (saved by an older version): its files are not checksummed")
    saved_ranks = checkpoint_world_size(checkpoint)
    if saved_ranks != world_size:
        raise ConfigError(f"--continue_from {checkpoint} was written by {saved_ranks} processes; "
                          f"resume it with {saved_ranks}, not {world_size}")
    try:
        step = int(torch.load(checkpoint / "trainer.pt", weights_only=True)["counters"]["step"])
    except Exception as error:  # unpickling raises many types; each means the file cannot be used
        raise ConfigError(f"--continue_from: {checkpoint / 'trainer.pt'}: unreadable ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None
    saved = json.loads((checkpoint / "config.json").read_text())
    if not isinstance(saved, dict):
        raise ConfigError(f"--continue_from: {checkpoint / 'config.json'} is not a json object")
    warnings += check_resume(saved, config, step=step, checkpoint=str(checkpoint))
    return checkpoint, step, warnings


# ----------------------------------------------------------------------------- the data


def check_data(data_dir: str | None, data_format: str = "auto") -> None:
    """Both splits present. Json shards: each a readable gzip file whose first record is json with a string `text`;
    token folders (train.pretokenize): train.token_shards' own consistency checks."""
    from train.data import SHARD_PATTERNS, check_data_source

    if data_dir is None:
        for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
                raise ConfigError(f"--data_dir is unset, so C4 streams from the hub, but {variable} is set: "
                                  "pass --data_dir with local shards, or unset it")
        return
    try:
        if check_data_source(data_dir, data_format) == "tokens":
            return
    except ValueError as error:
        raise ConfigError(f"--data_dir: {error}") from None
    for pattern in SHARD_PATTERNS.values():
        for file in sorted(glob.glob(str(Path(data_dir) / pattern))):
            problem = _first_record_problem(Path(file))
            if problem:
                raise ConfigError(f"--data_dir: {file}: {problem}")


def _first_record_problem(file: Path) -> str | None:
    try:
        with gzip.open(file, "rt", encoding="utf-8") as stream:
            line = stream.readline()
    except (OSError, EOFError, UnicodeDecodeError) as error:  # gzip.BadGzipFile is an OSError
        return f"cannot be read as gzip text ({error})"
    if not line.strip():
        return "holds no records (the first line is empty)"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"the first record is not json ({error})"
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        return f"the first record has no string 'text' field (found {keys})"
    return None


# ----------------------------------------------------------------------------- the tokenizer


def check_tokenizer(tokenizer: Any, name: str, *, vocab_size: int, model_config: str) -> list[str]:
    """A pad token, and every id the tokenizer can produce inside the embedding; returns warnings."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"--tokenizer {name} has no pad token; batches are padded with it")
    size = len(tokenizer)
    if size <= vocab_size:
        return []
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    ordinary = [index for index in range(vocab_size, size) if index not in special]
    if ordinary:
        raise ConfigError(f"--tokenizer {name} has {size} token ids but vocab_size of --model_config {model_config} is "
                          f"{vocab_size}: ids {ordinary[0]}..{ordinary[-1]} would index past the embedding; "
                          f"use a model config with vocab_size >= {size}")
    if tokenizer.unk_token_id is None:
        raise ConfigError(f"--tokenizer {name} has {size} token ids, vocab_size of --model_config {model_config} is "
                          f"{vocab_size}, and no unk token to read ids {vocab_size}..{size - 1} as; use a model config "
                          f"with vocab_size >= {size}")
    return [f"token ids {vocab_size}..{size - 1} ({tokenizer.convert_ids_to_tokens(size - 1)} ...) read as "
            f"{tokenizer.unk_token}; counted as data/unk_mapped_tokens"]
