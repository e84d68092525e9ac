"""The study spec (its format: train/study/__init__.py's docstring): parsing, checks, and the runs a stage's grid makes.

Everything here runs before any training: a bad spec raises StudyError with one line. `make_run` turns
one grid point into a run (name, folder, trainer flags); every run is checked by resolving its flags
exactly as `python -m train` does (train.config.resolve), so a value the trainer refuses stops the study
before its first run.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apollo
from train.config import ConfigError, TrainConfig, parse_args, parse_tokens, resolve
from train.optimizer_flags import FLAG_OPTIONS
from train.sweep import PlannedRun, _slug, command


class StudyError(ValueError):
    """A bad study spec; the message is one line."""


TOP_KEYS = {"out", "seeds", "warmup_fraction", "evals", "saves", "memory_device", "models", "common", "optimizers", "stages"}
STAGE_KEYS = {"name", "models", "budgets", "tokens_per_param", "optimizers", "seeds", "from", "top", "extend_edges"}
RESERVED = {"optimizer", "lr", "seed", "data_seed", "model_config", "num_training_steps", "max_train_tokens",
            "save_dir", "name", "continue_from", "dry_run"}
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class Stage:
    name: str
    models: list[str]
    budgets: list[tuple[str, float]]  # ("tokens", n) or ("per_param", k)
    optimizers: list[str]
    seeds: list[int]
    source: str | None = None
    top: int = 1
    extend_edges: int = 0


@dataclass
class Spec:
    path: Path
    out: Path
    models: dict[str, str]
    common: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]  # row (canonical name, or a row's own name) -> {flag: value or list}
    stages: list[Stage]
    warmup_fraction: float = 0.1
    evals: int = 2
    saves: int = 2
    memory_device: str = "cuda"
    _sizes: dict = field(default_factory=dict, repr=False)  # model -> (parameters, tokens per update)
    row_optimizers: dict[str, str] = field(default_factory=dict)  # a row named apart from its optimizer -> it

    def optimizer_of(self, row: str) -> str:
        """The --optimizer of a row of [optimizers] (its name, or its `optimizer` key)."""
        return self.row_optimizers.get(row, row)


@dataclass
class StudyRun(PlannedRun):
    stage: str = ""
    model: str = ""
    optimizer: str = ""
    seed: int = 0
    steps: int = 0
    tokens: int = 0  # trained tokens: steps x tokens per update
    settings: dict[str, Any] = field(default_factory=dict)  # the optimizer's flags (grid values included)
    axes: tuple[str, ...] = ()  # the grid keys, which name the run


def _flags(table: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in table.items():
        out += [f"--{key}"] if value is True else [] if value is False else [f"--{key}", str(value)]
    return out


def _check_table(where: str, table: Any, optimizers: list[str], allow_lists: bool) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise StudyError(f"{where}: must be a table")
    for key, value in table.items():
        if key not in FIELDS:
            raise StudyError(f"{where}: unknown trainer flag {key!r} (see python -m train --help)")
        if key in RESERVED and not (key == "lr" and allow_lists):
            raise StudyError(f"{where}: {key} is set by the study for each run; leave it out")
        if isinstance(value, list) and (not allow_lists or not value):
            raise StudyError(f"{where}.{key}: {'an empty grid' if allow_lists else 'a list is a grid: only in [optimizers.*]'}")
        for name in optimizers if key in FLAG_OPTIONS else []:
            if name not in FLAG_OPTIONS[key]:
                raise StudyError(f"{where}.{key}: --{key} does not apply to --optimizer {name} "
                                 f"(it is used by {', '.join(FLAG_OPTIONS[key])})")
    return table


def _list(stage: str, raw: dict, key: str, default: list, allowed=None) -> list:
    value = raw.get(key, default)
    value = value if isinstance(value, list) else [value]
    if not value:
        raise StudyError(f"stages.{stage}.{key}: empty")
    for item in value if allowed is not None else []:
        if item not in allowed:
            raise StudyError(f"stages.{stage}.{key}: unknown {item!r} (the spec has {', '.join(allowed)})")
    return value


def load_spec(path: str | Path) -> Spec:
    """Parse and check a spec (module docstring). StudyError (one line) on anything wrong, before any run."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{path}: no such spec file") from None
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML ({error})") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise StudyError(f"unknown key {unknown[0]!r} (the spec's keys: {', '.join(sorted(TOP_KEYS))})")
    for key in ("out", "models", "optimizers", "stages"):
        if not raw.get(key):
            raise StudyError(f"the spec needs {key!r}")
    models = raw["models"]
    for name, config in models.items():
        if not Path(config).is_file():
            raise StudyError(f"models.{name}: {config}: no such model config file")
    optimizers: dict[str, dict[str, Any]] = {}
    row_optimizers: dict[str, str] = {}
    for name, table in raw["optimizers"].items():
        # a row: an optimizer's table, or a table of its own name with `optimizer = NAME` and model-side flags
        # (adapter = "lora", lora_rank = 128: the optimizer plus an adapter of train/adapters.py)
        table = dict(table) if isinstance(table, dict) else table
        named = table.pop("optimizer", None) if isinstance(table, dict) else None
        try:
            canonical = apollo.canonical_name(named if named is not None else name)
        except (ValueError, TypeError):
            what = "unknown optimizer" if named is None else f"optimizer = {named!r} is unknown"
            raise StudyError(f"optimizers.{name}: {what} (one of {', '.join(apollo.optimizer_names())})") from None
        row = name if named is not None else canonical
        if named is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise StudyError(f"optimizers.{name}: a row's name is letters, digits, _ and -")
        if row in optimizers:
            raise StudyError(f"optimizers.{name}: {row} is given twice")
        _check_table(f"optimizers.{name}", table, [canonical], allow_lists=True)
        if "lr" not in table:
            raise StudyError(f"optimizers.{name}: needs an lr grid, e.g. lr = [1e-3, 2e-3, 4e-3]")
        optimizers[row] = {k: v if isinstance(v, list) else v for k, v in table.items()}
        if row != canonical:
            row_optimizers[row] = canonical
    common = _check_table("common", raw.get("common", {}), sorted({row_optimizers.get(r, r) for r in optimizers}),
                          allow_lists=False)
    for key in ("data_dir",):
        if key in common and not Path(common[key]).is_dir():
            raise StudyError(f"common.{key}: {common[key]}: no such folder")
    if str(common.get("tokenizer", "")).startswith((".", "/")) and not Path(common["tokenizer"]).exists():
        raise StudyError(f"common.tokenizer: {common['tokenizer']}: no such folder")
    seeds = raw.get("seeds", [0])
    stages: list[Stage] = []
    for index, s in enumerate(raw["stages"]):
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in {t.name for t in stages}:
            raise StudyError(f"stages[{index}]: needs a unique name of letters, digits, _ and -")
        bad = sorted(set(s) - STAGE_KEYS)
        if bad:
            raise StudyError(f"stages.{name}: unknown key {bad[0]!r} (a stage's keys: {', '.join(sorted(STAGE_KEYS))})")
        source = next((t for t in stages if t.name == s["from"]), None) if "from" in s else None
        if "from" in s and source is None:
            raise StudyError(f"stages.{name}.from: {s['from']!r} is not an earlier stage")
        if ("budgets" in s) == ("tokens_per_param" in s) and not (source and "tokens_per_param" not in s):
            raise StudyError(f"stages.{name}: give budgets or tokens_per_param (one of them)")
        if "budgets" in s:
            try:
                budgets = [("tokens", parse_tokens(b)) for b in _list(name, s, "budgets", [])]
            except argparse.ArgumentTypeError as error:
                raise StudyError(f"stages.{name}.budgets: {error}") from None
        elif "tokens_per_param" in s:
            budgets = [("per_param", float(k)) for k in _list(name, s, "tokens_per_param", [])]
        else:
            budgets = source.budgets
        stage = Stage(name, _list(name, s, "models", source.models if source else list(models), models), budgets,
                      [apollo.canonical_name(o) if o in apollo.ALIASES else o
                       for o in _list(name, s, "optimizers", source.optimizers if source else list(optimizers))],
                      _list(name, s, "seeds", seeds), s.get("from"), s.get("top", 1), s.get("extend_edges", 0))
        _list(name, {"optimizers": stage.optimizers}, "optimizers", [], optimizers)
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in [*stage.seeds, stage.top - 1, stage.extend_edges]):
            raise StudyError(f"stages.{name}: seeds and extend_edges must be integers >= 0, top >= 1")
        if any(k <= 0 for _, k in budgets):
            raise StudyError(f"stages.{name}: a budget must be positive")
        stages.append(stage)
    spec = Spec(path, Path(raw["out"]), models, common, optimizers, stages, raw.get("warmup_fraction", 0.1),
                raw.get("evals", 2), raw.get("saves", 2), raw.get("memory_device", "cuda"), row_optimizers=row_optimizers)
    if spec.memory_device not in ("cuda", "cpu") or not 0 <= spec.warmup_fraction < 1 or spec.evals < 1 or spec.saves < 1:
        raise StudyError("memory_device must be cuda or cpu, warmup_fraction in [0, 1), evals and saves >= 1")
    for stage in spec.stages:  # every run a stage can make (the whole grid, also behind `from`) must resolve
        for model, budget, optimizer in itertools.product(stage.models, stage.budgets, stage.optimizers):
            for run in grid_runs(spec, stage, model, budget, optimizer):
                _resolve_run(run)
    return spec


def _sizes(spec: Spec, model: str) -> tuple[int, int]:
    """(parameters, tokens per update) of a model under [common], from a resolved probe config (meta device)."""
    if model not in spec._sizes:
        from train.model import build_model

        probe = _resolve_argv(f"[common] with model {model}", ["--model_config", spec.models[model], *_flags(spec.common),
                                                 "--num_training_steps", "2", "--warmup_steps", "0"])
        parameters = sum(p.numel() for p in build_model(spec.models[model], device="meta").parameters())
        spec._sizes[model] = (parameters, probe.total_batch_size * probe.max_length)
    return spec._sizes[model]


def _resolve_argv(what: str, argv: list[str]) -> TrainConfig:
    try:
        return resolve(parse_args(argv))[0]
    except ConfigError as error:
        raise StudyError(f"{what}: {error}") from None


def _resolve_run(run: StudyRun) -> TrainConfig:
    return _resolve_argv(f"run {run.name}", command("train", [], run, resume=False)[3:])


def make_run(spec: Spec, stage: Stage, model: str, budget: tuple[str, float], optimizer: str,
             settings: dict[str, Any], axes: tuple[str, ...], seed: int) -> StudyRun:
    """The run of these settings: its name, folder and trainer flags (module docstring)."""
    parameters, per_update = _sizes(spec, model)
    requested = round(budget[1] if budget[0] == "tokens" else budget[1] * parameters)
    steps = requested // per_update
    if steps < 1:
        raise StudyError(f"stages.{stage.name}: a budget of {requested:,} tokens is smaller than one update of "
                         f"{per_update:,} tokens")
    derived = {}
    if "warmup_steps" not in spec.common:
        derived["warmup_steps"] = round(spec.warmup_fraction * steps)
    if "eval_every" not in spec.common:
        derived["eval_every"] = max(1, steps // spec.evals)
    if "save_every" not in spec.common:
        derived["save_every"] = max(1, math.ceil(steps / spec.saves))
    values = "-".join(f"{key}{_slug(format(settings[key], 'g') if isinstance(settings[key], float) else str(settings[key]))}"
                      for key in axes)
    name = "-".join(filter(None, [model, _budget_label(requested), optimizer, values, f"s{seed}"]))
    flags = [*_flags(spec.common), *_flags(derived), "--model_config", spec.models[model],
             "--optimizer", spec.optimizer_of(optimizer),
             *_flags(settings), "--num_training_steps", str(steps), "--seed", str(seed), "--data_seed", str(seed)]
    return StudyRun(name, spec.out / "runs" / name, flags, stage.name, model, optimizer, seed, steps, steps * per_update,
                    dict(settings), axes)


def _budget_label(tokens: int) -> str:
    """128 -> '128', 250000 -> '250K', 1500000 -> '1.5M': exact (a label that would round is written in full)."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        text = f"{tokens / size:.6g}"
        if tokens >= size and round(float(text) * size) == tokens:
            return text + unit
    return str(tokens)


def grid_runs(spec: Spec, stage: Stage, model: str, budget, optimizer: str) -> list[StudyRun]:
    table = spec.optimizers[optimizer]
    axes = tuple(["lr"] * isinstance(table["lr"], list) + [k for k, v in table.items() if isinstance(v, list) and k != "lr"])
    fixed = {k: v for k, v in table.items() if k not in axes}
    return [make_run(spec, stage, model, budget, optimizer, {**fixed, **dict(zip(axes, values))}, axes, seed)
            for values in itertools.product(*(table[k] for k in axes)) for seed in stage.seeds]
