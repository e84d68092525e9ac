"""The run configuration: one dataclass, the command line generated from it, and the checks that need no model.

Every option of a run is a field of `TrainConfig`, documented by its `help`; the optimizer-specific fields
are generated from the optimizer specs' `apollo.spec.Flag`s (`_with_optimizer_flags`: an optimizer registered
before this module is imported brings its flags). `build_parser` turns the fields into argparse flags one to one (`--lr 0.01`; booleans are store_true), so the commands of the
published APOLLO/GaLore scripts work unchanged. `resolve` checks every value and fills in what is
derived (the missing one of batch size / accumulation / total batch, steps from --max_train_tokens,
dtype, state dtype, save_dir, name); a bad value raises `ConfigError` with one line saying what to
change. The resolved config is what a run saves: config.json in the run folder, wandb.config and
every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import torch

import apollo
from apollo.layerwise import check_layerwise
from apollo.quant import SUPPORTED_BITS
from train.schedule import decay_steps
from train import adapters, optimizer_flags
from train import relora as relora_config
from train.optimizer_flags import optimizer_options  # noqa: F401  (re-exported: the trainer's options for the registry)


class ConfigError(ValueError):
    """A bad flag or combination of flags; the message is one line that says what to change."""


def parse_tokens(text: str) -> int:
    """'100M' -> 100_000_000, '1.3B' -> 1_300_000_000, '5000' -> 5000 (suffixes K, M, B)."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; write e.g. 5000, 100M or 1.3B")
    number, suffix = match.groups()
    multiplier = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[suffix.lower()]
    return round(Fraction(number.replace("_", "")) * multiplier)  # exact: no float round-off, no overflow


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, parse=None, low: float | None = None,
           high: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A TrainConfig field: its default, its documentation and (optionally) its allowed values or parser.

    The domain of a numeric field: `low <= value <= high`, `above < value < below` (any of them may be
    left out). `check_domains` enforces it, with the type's own domain (finite floats, 64-bit ints,
    strings neither empty nor holding control characters), for every field before anything else.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse, "low": low, "high": high,
                                            "above": above, "below": below})


def _defaults_help(values: dict[str, Any]) -> str:
    """'0.9; 0.95 soap' from {optimizer: its default}: the most common value, then the others with their optimizers."""
    by_value: dict[Any, list[str]] = {}
    for name, value in values.items():
        by_value.setdefault(value, []).append(name)
    common, *others = sorted(by_value, key=lambda value: -len(by_value[value]))
    return "; ".join([f"{common:g}", *(f"{value:g} {', '.join(by_value[value])}" for value in others)])


def _spec_defaults(attribute: str) -> dict[str, Any]:
    return {spec.name: getattr(spec, attribute) for spec in apollo.REGISTRY.values()}


def _with_optimizer_flags(after: str):
    """Class decorator (under @dataclass): one field per optimizer flag the registered specs declare
    (`optimizer_flags.declared_flags`), inserted after the field `after` (the optimizer section of --help).

    Each field is `option(flag.default, <its help and which optimizers take it>, choices=, low=, ...)` typed
    ``flag.kind`` (Optional where the default is None): the same field, flag, config.json key and domain check
    as a hand-written one. A flag named like a hand-written field is a ValueError (one line).
    """
    def insert(cls):
        written = cls.__dict__["__annotations__"]
        annotations: dict[str, Any] = {}
        for name, annotation in written.items():
            annotations[name] = annotation
            if name != after:
                continue
            for flag in optimizer_flags.declared_flags().values():
                if flag.name in written:
                    raise ValueError(f"optimizer flag --{flag.name} is also a hand-written TrainConfig field; rename one")
                annotations[flag.name] = flag.kind if flag.default is not None else Optional[flag.kind]
                setattr(cls, flag.name, option(flag.default, optimizer_flags.flag_help(flag), choices=flag.choices,
                                               low=flag.low, high=flag.high, above=flag.above, below=flag.below))
        cls.__annotations__ = annotations
        return cls
    return insert


@dataclass
@_with_optimizer_flags(after="grad_clipping")
class TrainConfig:
    """Every option of a training run. Field order is the order of `python -m train --help`; the optimizer flags
    the specs declare come after --grad_clipping."""

    # -- model and data --------------------------------------------------------------------------
    model_config: str = field(metadata={"help": "LLaMA config json, e.g. configs/llama_60m.json (required)"})
    tokenizer: str = option("t5-base", "tokenizer name or local folder (AutoTokenizer.from_pretrained)")
    data_dir: Optional[str] = option(
        None, "folder of C4 json.gz shards (c4-train.*, c4-validation.*); unset streams allenai/c4 from the hub")
    max_length: int = option(256, "tokens per sequence (truncate and pad to this length)", low=2)
    packing: bool = option(False, "concatenate documents with eos and cut full sequences (default: one padded document per sequence)")
    workers: int = option(8, "data loader worker processes per rank", low=0)
    data_format: str = option("auto", "data_dir holds C4 json shards (text) or token shards of python -m train.pretokenize "
                                      "(tokens); auto: tokens when data_dir is such a folder", choices=("auto", "text", "tokens"))
    data_seed: int = option(42, "seed of the data order (shard order and document shuffle buffer), apart from --seed; "
                                "42 is the fixed order of runs made before this flag", low=0, high=2**32 - 1)

    # -- batch: batch_size x gradient_accumulation x world size == total_batch_size ----------------
    batch_size: Optional[int] = option(None, "micro-batch per process, in sequences", low=1)
    gradient_accumulation: Optional[int] = option(None, "micro-batches per update (derived from the other two if unset)", low=1)
    total_batch_size: Optional[int] = option(None, "sequences per update over all processes (derived if unset)", low=1)
    eval_batch_size: Optional[int] = option(None, "validation micro-batch per process (default: --batch_size)", low=1)

    # -- schedule --------------------------------------------------------------------------------
    lr: float = option(1e-4, "peak learning rate", low=0.0)
    scheduler: str = option("cosine", "decay after warmup; wsd: warmup, constant peak, linear decay over the last "
                                      "--decay_fraction of the updates; cosine_restarts: ReLoRA's jagged cosine (--cycle_length, "
                                      "--restart_warmup_steps)", choices=("cosine", "linear", "constant", "wsd", "cosine_restarts"))
    warmup_steps: int = option(1000, "updates of linear warmup from lr 0", low=0)
    num_training_steps: int = option(10_000, "number of optimizer updates (exactly this many)", low=1)
    max_train_tokens: Optional[int] = option(
        None, "train on this many tokens instead (K/M/B suffixes): num_training_steps = tokens // (total_batch_size x max_length)",
        parse=parse_tokens, low=1)
    min_lr_ratio: float = option(0.1, "final lr as a fraction of the peak, in [0, 1]", low=0.0, high=1.0)
    decay_fraction: float = option(0.2, "--scheduler wsd: fraction of the updates in the final decay, in (0, 1]; "
                                        "round(fraction x num_training_steps) updates, at least 1", above=0.0, high=1.0)

    # -- optimizer -------------------------------------------------------------------------------
    optimizer: str = option("adamw", f"one of apollo.optimizer_names(): {' | '.join(apollo.optimizer_names())} "
                                     f"(aliases {', '.join(apollo.ALIASES)})")
    weight_decay: float = option(0.0, "decoupled weight decay", low=0.0)
    beta1: Optional[float] = option(None, "first-moment decay, passed to every optimizer (default: the optimizer's; "
                                          f"{_defaults_help({k: b[0] for k, b in _spec_defaults('default_betas').items()})})",
                                    low=0.0, below=1.0)
    beta2: Optional[float] = option(None, "second-moment decay, passed to every optimizer (default: the optimizer's; "
                                          f"{_defaults_help({k: b[1] for k, b in _spec_defaults('default_betas').items()})})",
                                    low=0.0, below=1.0)
    eps: Optional[float] = option(None, "epsilon of the second moment (default: the optimizer's; "
                                        f"{_defaults_help({k: e for k, e in _spec_defaults('default_eps').items() if e})})",
                                  above=0.0)
    grad_clipping: float = option(0.0, "clip the global gradient norm to this value; 0 turns clipping off", low=0.0)
    # here: the optimizer-specific flags (--rank, --apollo_scale, --fira_alpha, ...), generated from the specs' Flags
    state_dtype: Optional[str] = option(
        None, "optimizer-state dtype: float32, or param (follow the weights); default float32 where the optimizer can keep "
              "float32 states of bfloat16 weights, else param (torch's AdamW and Muon, bitsandbytes)",
        choices=("float32", "param"))

    # -- precision and memory --------------------------------------------------------------------
    dtype: Optional[str] = option(None, "dtype of the whole model (default bfloat16 on GPUs that support it, else float32)",
                                  choices=("bfloat16", "float32"))
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    single_gpu: bool = option(False, "one process, no DistributedDataParallel wrapper")
    fsdp: bool = option(False, "shard weights, gradients and optimizer state over the processes with FSDP2 "
                               "(fully_shard per decoder layer and the root) instead of DDP; sharded checkpoints")
    fsdp_mixed_precision: bool = option(False, "with --fsdp: compute in bfloat16 and reduce gradients in float32; "
                                               "weights and optimizer state stay float32 (--dtype float32)")
    replicate_degree: int = option(1, "with --fsdp: HSDP, a 2-D mesh of R replicas x world/R shards (typically R = nodes): "
                                      "weights shard inside a replica and gradients are averaged across replicas", low=1)
    weight_quant: bool = option(False, "store attention/MLP weights as uint8 groups (Q-APOLLO; needs a low-rank optimizer)")
    weight_bits: int = option(8, "bits per quantised weight (only 8 is supported)")
    weight_group_size: int = option(128, "elements per quantisation group (scale and zero point); must divide every "
                                         "attention/MLP weight", low=1)
    stochastic_round: bool = option(False, "re-quantise updated int8 weights with stochastic rounding (seeded, resumable)")
    layerwise: bool = option(False, "update each parameter during backward as soon as its gradient exists (one process, "
                                    "no accumulation, no clipping)")
    compile: bool = option(False, "compile each decoder layer with torch.compile (inductor), after activation "
                                  "checkpointing and before FSDP2/DDP; graphs compiled after the first update are logged")
    compile_optimizer: bool = option(False, "the low-rank moments of the fused APOLLO/GaLore step in one compiled kernel "
                                            "per weight (the optimizer's elementwise='compiled'); equal up to float round-off")

    # -- model-side adapters (LoRA, Low-Rank: train/adapters.py) ---------------------------------
    adapter: str = option("none", "train adapters instead of the attention/MLP weights: lora (W0 frozen at its init "
                                  "+ (alpha/r) B A, peft) or low_rank (the weight replaced by (alpha/r) B A, no W0)",
                          choices=("none", *adapters.ADAPTERS))
    lora_rank: Optional[int] = option(None, "rank r of the adapters' factors (required with --adapter; below min(m, n) "
                                            "of every attention/MLP weight)", low=1)
    lora_alpha: float = option(32.0, "adapter scale numerator: s = alpha / r", above=0.0)
    lora_dropout: float = option(0.05, "dropout on the adapters' input (GaLore's LoRA value)", low=0.0, below=1.0)
    lora_init: Optional[str] = option(None, "init of the factors: zero_b (A kaiming-uniform, B = 0; LoRA's default) or "
                                            "uniform (both U(+-1/sqrt fan_in); Low-Rank's default)",
                                      choices=("zero_b", "uniform"))

    # -- relora: ReLoRA's merges, optimizer pruning and jagged cosine (train/relora.py) ---------------
    cycle_length: Optional[int] = option(None, "--scheduler cosine_restarts: updates per cycle C (must divide "
                                               "--num_training_steps); --relora prunes after updates kC + 1", low=1)
    restart_warmup_steps: Optional[int] = option(None, "--scheduler cosine_restarts: updates of each restart's linear ramp, Wr",
                                                 low=0)
    adjust_step: int = option(0, "--scheduler cosine_restarts: shift of the restarts, s = t + adjust_step after the first "
                                 "warmup (published for warm-started runs)", low=0)
    restart_variant: str = option("galore", "--scheduler cosine_restarts: galore (GaLore's copy: each ramp aims at the "
                                            "cosine at the cycle's start) or relora_head (Guitaricet/relora HEAD: at the "
                                            "ramp's end, no ramp in the first cycle)", choices=("galore", "relora_head"))
    relora: Optional[int] = option(None, "ReLoRA: merge the LoRA factors into the frozen weights and re-initialise them "
                                         "every this many updates T_m (after updates k T_m + 1); needs LoRA adapters and "
                                         "--scheduler cosine_restarts", low=1)
    relora_cycles: Optional[int] = option(None, "ReLoRA in K equal cycles: sets --relora and --cycle_length to "
                                                "num_training_steps / K (K must divide it); for studies and "
                                                "--max_train_tokens, where the number of updates is derived", low=1)
    reset_optimizer_on_relora: bool = option(False, "ReLoRA: random pruning of 99.9% of the factors' Adam moments after "
                                                    "updates kC + 1 (the default mode when none is given)")
    optimizer_random_pruning: Optional[float] = option(None, "ReLoRA: zero each Adam moment entry of the factors with "
                                                             "this probability after updates kC + 1", low=0.0, below=1.0)
    optimizer_magnitude_pruning: Optional[float] = option(None, "ReLoRA: zero the factors' Adam moment entries with |x| <= "
                                                                "their quantile at this ratio after updates kC + 1",
                                                          low=0.0, below=1.0)

    # -- evaluation, checkpoints, failures -------------------------------------------------------
    eval_every: int = option(5000, "evaluate every this many updates (and at the end)", low=1)
    eval_tokens: int = option(10_000_000, "validation tokens (non-pad) per evaluation, K/M/B suffixes", parse=parse_tokens, low=1)
    save_every: int = option(10_000, "save a checkpoint every this many updates (and at the end)", low=1)
    keep_last: Optional[int] = option(None, "keep only the newest N complete checkpoints: an older one is deleted once a "
                                            "newer one is complete (default: keep all)", low=1)
    save_dir: Optional[str] = option(
        None, "run folder: config.json, metrics.jsonl, step_* checkpoints (default checkpoints/<model>-<time>, "
              "or the run folder of --continue_from)")
    continue_from: Optional[str] = option(None, "resume exactly from a checkpoint folder, or the latest checkpoint of a run folder")
    async_save: bool = option(False, "with --fsdp: write checkpoint shards in the background (torch.distributed.checkpoint"
                                     ".async_save); training goes on, and the checkpoint is committed (manifest, rename) "
                                     "at the next save or the end; the last save of a run is synchronous")
    resume: str = option("auto", "auto: when --save_dir holds checkpoints of this same run, resume its newest complete one "
                                 "(a restarted or requeued job runs the same command again; a finished run exits 0); "
                                 "never: refuse a --save_dir with checkpoints; or a checkpoint / run folder to resume "
                                 "(as --continue_from)")
    seed: int = option(0, "seed of torch, python and numpy random (model initialisation; the data order is --data_seed)",
                       low=0, high=2**32 - 1)
    dry_run: bool = option(False, "check everything and print the plan (parameter split, batch arithmetic, steps, tokens, "
                                  "memory estimate) without training: nothing is allocated, no data is read")
    nan_policy: str = option("stop", "on a NaN/inf loss: stop (exit 1, naming the update) or skip that update",
                             choices=("stop", "skip"))

    # -- logging ---------------------------------------------------------------------------------
    log_every: int = option(1, "log train metrics every this many updates", low=1)
    peak_tflops: Optional[float] = option(None, "the device's peak TFLOP/s for MFU (default: its dense bfloat16 peak when "
                                                "the device name is known, e.g. A100 312, H100 989; else MFU is not logged)",
                                          above=0.0)
    wandb: Optional[str] = option(None, "wandb mode (default: $WANDB_MODE, else online)", choices=("online", "offline", "disabled"))
    project: str = option("apollo", "wandb project")
    name: Optional[str] = option(None, "run name (default: the run folder's name)")
    entity: Optional[str] = option(None, "wandb entity (user or team)")

    def to_dict(self) -> dict[str, Any]:
        """Plain json-able values, field order kept."""
        return dataclasses.asdict(self)


_INT64_MAX = 2**63 - 1  # counters and token ids end up in int64 tensors


def _domain(meta: dict[str, Any], integer: bool) -> str:
    """'a positive integer', '>= 0', 'in [0, 1)', ... from a field's low/high/above/below."""
    low, high, above, below = (meta.get(key) for key in ("low", "high", "above", "below"))
    if integer and low == 1 and high is None and below is None:
        return "a positive integer"
    show = (lambda x: str(x)) if integer else (lambda x: f"{x:g}")
    start = f"[{show(low)}" if low is not None else f"({show(above)}" if above is not None else None
    end = f"{show(high)}]" if high is not None else f"{show(below)})" if below is not None else None
    if start and end:
        return f"in {start}, {end}"
    if start:
        return f">= {show(low)}" if low is not None else f"> {show(above)}"
    return f"<= {show(high)}" if high is not None else f"< {show(below)}"


def check_domains(c: TrainConfig) -> None:
    """Every field that is set lies in its domain: its type's (finite floats, 64-bit integers, strings neither empty
    nor holding control characters) and the range its `option(low=, high=, above=, below=)` declares.

    Derived from the fields themselves, so a new field is checked by declaring its range. Raises ConfigError.
    """
    for spec in dataclasses.fields(TrainConfig):
        value, flag, meta = getattr(c, spec.name), f"--{spec.name}", spec.metadata
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            if not value.strip():
                raise ConfigError(f"{flag} must not be empty")
            if any(ord(char) < 32 or ord(char) == 127 for char in value):
                raise ConfigError(f"{flag} {value!r} holds a control character")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if isinstance(value, int) and abs(value) > _INT64_MAX:
            raise ConfigError(f"{flag} {value} does not fit in 64 bits")
        low, high, above, below = (meta.get(key) for key in ("low", "high", "above", "below"))
        if ((low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise ConfigError(f"{flag} must be {_domain(meta, isinstance(value, int))}, got {value}")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see python -m train --help)")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, with the field's help, type, default and choices."""
    parser = _Parser(prog="python -m train", description="Pretrain a LLaMA model on C4 with APOLLO or its peers.",
                     allow_abbrev=False)
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        meta, flag = dict(spec.metadata), f"--{spec.name}"
        meta["help"] = meta["help"].replace("%", "%%")  # argparse formats help with %: "99.9%" must reach it as "99.9%%"
        kind = hints[spec.name]
        kind = next(a for a in typing.get_args(kind) if a is not type(None)) if typing.get_origin(kind) is typing.Union else kind
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
        elif spec.default is dataclasses.MISSING:
            parser.add_argument(flag, type=kind, required=True, help=meta["help"])
        else:
            shown = "" if spec.default is None or "default" in meta["help"] else f" (default: {spec.default})"
            parser.add_argument(flag, type=meta.get("parse") or kind, default=spec.default,
                                choices=meta.get("choices"), help=meta["help"] + shown)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig (not yet resolved). ConfigError on an unknown flag or a value of the wrong type."""
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace))


def resolve(config: TrainConfig, world_size: int = 1) -> tuple[TrainConfig, list[str]]:
    """Check every value and fill in the derived ones; returns (resolved config, warnings).

    Opens no file: the checks that read the model config, tokenizer, data, a checkpoint or the wandb
    login are in train/__main__.py. Raises ConfigError with one line that says what to change.
    """
    c = dataclasses.replace(config)
    warnings: list[str] = []
    check_domains(c)  # every value given, by its field's domain
    try:
        c.optimizer = apollo.canonical_name(c.optimizer)
    except ValueError as error:
        raise ConfigError(f"--optimizer: {error}") from None

    if not 0.0 < c.decay_fraction <= 1.0:  # also NaN
        raise ConfigError(f"--decay_fraction must be in (0, 1], got {c.decay_fraction}")
    if c.data_format == "tokens" and c.data_dir is None:
        raise ConfigError("--data_format tokens needs --data_dir, a folder written by python -m train.pretokenize")

    _resolve_batch(c, world_size)
    if c.max_train_tokens is not None:
        tokens_per_update = c.total_batch_size * c.max_length
        c.num_training_steps = c.max_train_tokens // tokens_per_update
        if c.num_training_steps < 1:
            raise ConfigError(f"--max_train_tokens {c.max_train_tokens} is less than one update "
                              f"({c.total_batch_size} sequences x {c.max_length} tokens = {tokens_per_update}); raise it")
    if c.warmup_steps >= c.num_training_steps:
        raise ConfigError(f"--warmup_steps {c.warmup_steps} must be smaller than --num_training_steps {c.num_training_steps}")
    decay = decay_steps(c.num_training_steps, c.decay_fraction)
    if c.scheduler == "wsd" and c.num_training_steps - decay < c.warmup_steps:
        raise ConfigError(f"--scheduler wsd: the decay ({decay} of {c.num_training_steps} updates, --decay_fraction "
                          f"{c.decay_fraction}) would start before the {c.warmup_steps} warmup updates end; "
                          f"lower --decay_fraction or --warmup_steps")
    try:
        relora_config.check_config(c)
    except ValueError as error:  # ReLoRAError and the schedule's checks: one line each
        raise ConfigError(str(error)) from None
    if c.single_gpu and world_size > 1:
        raise ConfigError(f"--single_gpu runs one process, but {world_size} were launched; drop --single_gpu or use --nproc_per_node 1")

    if c.dtype is None:  # --fsdp keeps float32 shards; --fsdp_mixed_precision computes in bfloat16
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not c.fsdp
        c.dtype = "bfloat16" if bf16 else "float32"
    warnings += _resolve_optimizer_flags(c)
    _resolve_adapter(c)
    warnings += _resolve_memory_modes(c, world_size)
    if c.wandb is None:
        env_mode = os.environ.get("WANDB_MODE", "online")
        c.wandb = env_mode if env_mode in ("online", "offline", "disabled") else "online"
    if c.save_dir is None:
        if c.continue_from is not None:
            origin = Path(c.continue_from)
            c.save_dir = str(origin.parent if (origin / "trainer.pt").exists() else origin)
        else:
            c.save_dir = f"checkpoints/{Path(c.model_config).stem}-{datetime.now():%Y-%m-%d-%H-%M-%S}"
    if c.name is None:
        c.name = Path(c.save_dir).name
    check_domains(c)  # the derived values too (a product of batch sizes, a folder's name)
    return c, warnings


def _resolve_batch(c: TrainConfig, world_size: int) -> None:
    """Fill the missing one of batch_size / gradient_accumulation / total_batch_size, or say which is wrong."""
    batch, accum, total = c.batch_size, c.gradient_accumulation, c.total_batch_size
    procs = f"{world_size} process{'es' if world_size > 1 else ''}"
    if batch is None:
        if accum is None or total is None:
            raise ConfigError("--batch_size (micro-batch per process) is required unless both --gradient_accumulation "
                              "and --total_batch_size are given")
        if total % (accum * world_size):
            raise ConfigError(f"--total_batch_size {total} is not divisible by --gradient_accumulation {accum} x {procs}")
        batch = total // (accum * world_size)
    elif total is None:
        accum = accum or 1
        total = batch * accum * world_size
    elif accum is None:
        if total % (batch * world_size):
            raise ConfigError(f"--total_batch_size {total} is not a multiple of --batch_size {batch} x {procs} "
                              f"= {batch * world_size}; change --batch_size or --total_batch_size")
        accum = total // (batch * world_size)
    elif batch * accum * world_size != total:
        raise ConfigError(f"--batch_size {batch} x --gradient_accumulation {accum} x {procs} = {batch * accum * world_size}, "
                          f"not --total_batch_size {total}; change one of them (or leave one out to derive it)")
    c.batch_size, c.gradient_accumulation, c.total_batch_size = batch, accum, total


def _resolve_optimizer_flags(c: TrainConfig) -> list[str]:
    """Refuse optimizer flags the chosen optimizer does not take; settle betas and the optimizer-state dtype."""
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
    refused = optimizer_flags.refused_flags(c, defaults)
    if refused:
        raise ConfigError(refused[0])
    betas = optimizer_flags.default_betas(c.optimizer)
    c.beta1 = betas[0] if c.beta1 is None else c.beta1
    c.beta2 = betas[1] if c.beta2 is None else c.beta2
    warnings = []  # the values' ranges are the fields' own (check_domains)
    param_only = c.optimizer in optimizer_flags.PARAM_DTYPE_STATES
    if c.state_dtype is None:
        c.state_dtype = "param" if param_only else "float32"
    elif c.state_dtype == "float32" and param_only and c.dtype != "float32":
        warnings.append(f"--state_dtype float32 is ignored by {c.optimizer}: its states follow the weights ({c.dtype})")
        c.state_dtype = "param"
    return warnings


def _resolve_adapter(c: TrainConfig) -> None:
    """--adapter and its flags: a flag without an adapter, an adapter without --lora_rank, and the modes and
    optimizers the adapter's spec refuses (train/adapters.py) are one-line errors."""
    if c.adapter == "none":
        defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
        given = [flag for flag in adapters.FLAGS if getattr(c, flag) != defaults[flag]]
        if given:
            raise ConfigError(f"--{given[0]} needs --adapter {' or '.join(adapters.ADAPTERS)}")
        return
    if c.lora_rank is None:
        raise ConfigError(f"--adapter {c.adapter} needs --lora_rank (the rank r of its factors)")
    refusal = adapters.refusal(c)
    if refusal:
        raise ConfigError(refusal)


def _resolve_memory_modes(c: TrainConfig, world_size: int) -> list[str]:
    """Check --weight_quant and its settings, and --layerwise; warn about quantisation flags without --weight_quant."""
    if c.weight_group_size < 1:
        raise ConfigError(f"--weight_group_size must be a positive integer, got {c.weight_group_size}")
    if c.weight_bits not in SUPPORTED_BITS:
        raise ConfigError(f"--weight_bits must be 8 (only 8-bit weights are supported), got {c.weight_bits}")
    refusal = optimizer_flags.check_modes(c)
    if refusal:
        raise ConfigError(refusal)
    if c.fsdp_mixed_precision and not c.fsdp:
        raise ConfigError("--fsdp_mixed_precision needs --fsdp")
    if c.fsdp:
        if world_size < 2:
            raise ConfigError("--fsdp shards over processes: launch with torchrun --nproc_per_node N, N > 1 "
                              "(one process trains without it)")
        for flag in ("single_gpu", "weight_quant", "layerwise"):
            if getattr(c, flag):
                raise ConfigError(f"--fsdp does not combine with --{flag}")
        if c.fsdp_mixed_precision and c.dtype != "float32":
            raise ConfigError(f"--fsdp_mixed_precision keeps float32 weights and computes in bfloat16: "
                              f"use --dtype float32, not {c.dtype}")
        if c.optimizer not in optimizer_flags.PARAM_DTYPE_STATES and c.state_dtype == "float32" and c.dtype != "float32":
            raise ConfigError(f"--fsdp with {c.optimizer} needs the optimizer state in the weights' dtype: "
                              "use --dtype float32 (with --fsdp_mixed_precision for bfloat16 compute) "
                              "or --state_dtype param")
    if c.compile:
        for flag in ("weight_quant", "layerwise"):  # int8 layers' autograd functions / backward hooks: not traced
            if getattr(c, flag):
                raise ConfigError(f"--compile does not combine with --{flag}; drop one of them")
    if c.layerwise:
        try:
            check_layerwise(gradient_accumulation=c.gradient_accumulation, grad_clipping=c.grad_clipping,
                            world_size=world_size, nan_policy=c.nan_policy)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if c.weight_quant:
        return []
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
    return [f"--{name} is ignored without --weight_quant" for name in ("weight_bits", "weight_group_size", "stochastic_round")
            if getattr(c, name) != defaults[name]]
