"""Flag sweeps: run a recipe over a grid of values, one run after another, resumably.

    python -m train.sweep scripts/benchmark_c4/llama_60m_apollo.sh --apollo_scale 1,2,3 --rank 128,256 \
        --sweep_dir runs/scale_rank [--print]

Every trainer flag after the recipe whose value holds commas is a grid axis; the others are passed to
every run unchanged. Runs are named `<recipe>-<flag><value>-...` from their grid values and live in
`<sweep_dir>/<name>/`. Each run is the recipe with the run's flags appended (a recipe forwards "$@" to
the trainer, and the last occurrence of a flag wins), plus `--save_dir` and `--name`.

A run whose latest checkpoint has reached its `num_training_steps` is skipped; one with an earlier
checkpoint is resumed with `--continue_from`; a folder with no checkpoint is moved aside (renamed, not
deleted) and the run starts again. `--print` prints the commands instead of running them. At the end
`<sweep_dir>/comparison.md` and `perplexity.png` compare every run that has metrics.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from train.checkpoint import find_checkpoint


class SweepError(ValueError):
    """A bad sweep specification; the message is one line."""


@dataclass
class PlannedRun:
    name: str
    directory: Path
    flags: list[str]  # the grid values of this run, as trainer flags


def parse_grid(tokens: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split trainer flags into (fixed flags, grid axes). `--lr 1e-3,5e-3` is an axis; `--packing` or `--seed 1` fixed."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    index = 0
    while index < len(tokens):
        flag = tokens[index]
        if not flag.startswith("--"):
            raise SweepError(f"expected a --flag, got {flag!r}")
        value = tokens[index + 1] if index + 1 < len(tokens) and not tokens[index + 1].startswith("--") else None
        index += 1 if value is None else 2
        if value is not None and "," in value:
            values = [v for v in value.split(",") if v]
            if len(values) < 2:
                raise SweepError(f"{flag} {value!r}: a grid axis needs at least two comma-separated values")
            if flag[2:] in axes:
                raise SweepError(f"{flag} is given twice")
            axes[flag[2:]] = values
        else:
            fixed += [flag] if value is None else [flag, value]
    for reserved in ("save_dir", "name", "continue_from"):
        if reserved in axes or f"--{reserved}" in fixed:
            raise SweepError(f"--{reserved} is set by the sweep for each run; leave it out")
    return fixed, axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def plan(recipe: str, sweep_dir: Path, axes: dict[str, list[str]]) -> list[PlannedRun]:
    """Every combination of the axes, in the order given, with its run name and folder."""
    base = Path(recipe).stem if recipe != "train" else "train"
    runs = []
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        name = "-".join([base] + [f"{key}{_slug(value)}" for key, value in zip(keys, values)])
        flags = [item for key, value in zip(keys, values) for item in (f"--{key}", value)]
        runs.append(PlannedRun(name, sweep_dir / name, flags))
    return runs


def run_status(directory: Path) -> str:
    """'new' (no folder), 'done' (latest checkpoint reached num_training_steps), 'partial' (an earlier
    checkpoint), or 'empty' (a folder with no checkpoint: a run that died before its first save)."""
    if not directory.exists():
        return "new"
    try:
        checkpoint = find_checkpoint(directory)
    except ValueError:
        return "empty"
    config = json.loads((checkpoint / "config.json").read_text())
    step = int(checkpoint.name.rsplit("_", 1)[1])
    return "done" if step >= config["num_training_steps"] else "partial"


def command(recipe: str, fixed: list[str], run: PlannedRun, resume: bool) -> list[str]:
    """The command of one run: the recipe (a shell script, or `train` for `python -m train`) and its flags."""
    prefix = [sys.executable, "-m", "train"] if recipe == "train" else ["bash", recipe]
    flags = fixed + run.flags + ["--save_dir", str(run.directory), "--name", run.name]
    return prefix + flags + (["--continue_from", str(run.directory)] if resume else [])


def _move_aside(directory: Path) -> Path:
    for attempt in itertools.count(1):
        target = directory.with_name(f"{directory.name}.failed-{attempt}")
        if not target.exists():
            directory.rename(target)
            return target
    raise AssertionError("unreachable")


def execute(recipe: str, fixed: list[str], run: PlannedRun, position: str = "",
            launch: Callable[[list[str]], int] | None = None) -> bool:
    """Bring one run to its end: skip it if finished, resume it if interrupted, else start it (a folder without a
    checkpoint is moved aside first). `launch(command) -> exit code` runs the command (default: a subprocess).
    Returns whether the run is finished."""
    status = run_status(run.directory)
    if status == "done":
        print(f"{position} {run.name}: finished already, skipped", file=sys.stderr)
        return True
    if status == "empty":
        moved = _move_aside(run.directory)
        print(f"{position} {run.name}: no checkpoint in its folder; moved it to {moved.name}", file=sys.stderr)
    cmd = command(recipe, fixed, run, resume=status == "partial")
    verb = "resuming" if status == "partial" else "starting"
    print(f"{position} {run.name}: {verb}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    returncode = launch(cmd) if launch is not None else subprocess.run(cmd).returncode
    if returncode != 0 or run_status(run.directory) != "done":
        print(f"{position} {run.name}: exited {returncode} before finishing", file=sys.stderr)
        return False
    return True


def sweep(recipe: str, tokens: list[str], sweep_dir: str | Path, *, print_only: bool = False) -> int:
    """Run (or print) every run of the grid; returns the number of runs that failed."""
    if recipe != "train" and not Path(recipe).is_file():
        raise SweepError(f"recipe {recipe}: no such file (a scripts/benchmark_c4/*.sh recipe, or 'train')")
    fixed, axes = parse_grid(tokens)
    if not axes:
        raise SweepError("no grid axis: give at least one flag with comma-separated values, e.g. --lr 1e-3,5e-3")
    sweep_dir = Path(sweep_dir)
    runs = plan(recipe, sweep_dir, axes)
    failed = []
    for index, run in enumerate(runs, 1):
        if print_only:
            status = run_status(run.directory)
            print(("# done: " if status == "done" else "") + shlex.join(command(recipe, fixed, run, status == "partial")))
        elif not execute(recipe, fixed, run, f"[{index}/{len(runs)}]"):
            failed.append(run.name)
    if not print_only:
        _compare(runs, sweep_dir)
        if failed:
            print(f"sweep: {len(failed)} of {len(runs)} runs did not finish: {', '.join(failed)}", file=sys.stderr)
    return len(failed)


def _compare(runs: list[PlannedRun], sweep_dir: Path) -> None:
    from train.compare import RunError, compare

    present = [str(run.directory) for run in runs if (run.directory / "metrics.jsonl").is_file()]
    if not present:
        return
    try:
        compare(present, sweep_dir, title=sweep_dir.name)
        print(f"sweep: wrote {sweep_dir / 'comparison.md'} and {sweep_dir / 'perplexity.png'}", file=sys.stderr)
    except RunError as error:
        print(f"sweep: no comparison: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.sweep", description="Run a recipe over a grid of flag values (comma-separated).",
        epilog="Example: python -m train.sweep scripts/benchmark_c4/llama_60m_apollo.sh --lr 5e-3,1e-2 "
               "--rank 128,256 --sweep_dir runs/lr_rank")
    parser.add_argument("recipe", help="a recipe script that forwards \"$@\" to the trainer, or 'train' for python -m train")
    parser.add_argument("--sweep_dir", required=True, help="folder that holds one run folder per grid point")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the commands, run nothing")
    args, tokens = parser.parse_known_args(argv)
    try:
        failed = sweep(args.recipe, tokens, args.sweep_dir, print_only=args.print_only)
    except SweepError as error:
        print(f"sweep: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
