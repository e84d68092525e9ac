"""Fair optimizer comparisons: a study spec -> a plan of runs -> the runs -> a report (train/study/report.py).

The runs of a study (`python -m train.study`; the spec format is in train/study/__init__.py's docstring):
each stage's grid or its picks from an earlier stage (`stage_runs`), the lr-edge extensions
(`edge_runs`), the time they take at measured rates (`print_plan`, `write_slurm`), and running them
through train.sweep.execute (`run_study`): finished runs are skipped, interrupted ones resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import apollo
from train.study.report import load_result, write_report
from train.study.spec import Spec, Stage, StudyError, StudyRun, _resolve_run, _sizes, grid_runs, load_spec, make_run
from train.sweep import command, execute, run_status


def _loss(run: StudyRun) -> float | None:
    result = load_result(run.directory)
    return result.loss if result else None


def _mean_losses(runs: list[StudyRun]) -> dict[tuple, tuple[float, StudyRun]]:
    """Settings -> (mean final loss over seeds, one of its runs), finished runs only."""
    losses: dict[tuple, list] = {}
    for run in runs:
        loss = _loss(run)
        if loss is not None:
            key = tuple(sorted(run.settings.items()))
            losses.setdefault(key, []).append((loss, run))
    return {key: (sum(l for l, _ in items) / len(items), items[0][1]) for key, items in losses.items()}


def stage_runs(spec: Spec, stage: Stage, planned: dict[str, list[StudyRun]], settled: Callable[[StudyRun], bool]
               ) -> tuple[list[StudyRun], str | None]:
    """The stage's runs as far as they can be known, and why more may follow (None: the list is complete).

    `planned`: the runs of the earlier stages; `settled(run)`: whether a run is over (finished, or failed in this
    session), which decides when a `from` stage or an edge extension can be chosen.
    """
    runs: list[StudyRun] = []
    for model, budget, optimizer in itertools.product(stage.models, stage.budgets, stage.optimizers):
        if stage.source is None:
            runs += grid_runs(spec, stage, model, budget, optimizer)
            continue
        source = planned[stage.source]
        if not all(settled(r) for r in source):
            count = len(stage.models) * len(stage.budgets) * len(stage.optimizers) * stage.top * len(stage.seeds)
            return [], f"{count} runs chosen from stage {stage.source} once its {len(source)} runs are over"
        mine = [r for r in source if r.optimizer == optimizer]
        at_model = [r for r in mine if r.model == model] or [r for r in mine if r.model == mine[0].model] if mine else []
        wanted = make_run(spec, stage, model, budget, optimizer, {}, (), 0).tokens
        at_budget = [r for r in at_model if r.tokens == wanted] or [r for r in at_model if r.tokens == at_model[0].tokens]
        ranked = sorted(_mean_losses(at_budget).values(), key=lambda item: item[0])[:stage.top]
        runs += [make_run(spec, stage, model, budget, optimizer, best.settings, best.axes, seed)
                 for _, best in ranked for seed in stage.seeds]
    for _ in range(stage.extend_edges):
        if not all(settled(r) for r in runs):
            return runs, f"up to {stage.extend_edges} more lrs per optimizer where a best lr sits at a grid edge"
        more = [r for r in edge_runs(spec, stage, runs) if r.name not in {x.name for x in runs}]
        if not more:
            break
        runs += more
    return runs, None


def edge_runs(spec: Spec, stage: Stage, runs: list[StudyRun]) -> list[StudyRun]:
    """One more lr beyond the edge for every (model, budget, optimizer, other settings) whose best lr is an edge."""
    out = []
    cells: dict[tuple, list[StudyRun]] = {}
    for run in runs:
        others = tuple(sorted((k, v) for k, v in run.settings.items() if k != "lr"))
        cells.setdefault((run.model, run.tokens, run.optimizer, others), []).append(run)
    for members in cells.values():
        means = _mean_losses(members)
        lrs = sorted({r.settings["lr"] for r in members})
        if len(lrs) < 2 or not means:
            continue
        best = min(means.values(), key=lambda item: item[0])[1]
        lr = best.settings["lr"]
        if lr == lrs[-1]:
            lr = lr * lrs[-1] / lrs[-2]
        elif lr == lrs[0]:
            lr = lr * lrs[0] / lrs[1]
        else:
            continue
        budget = ("tokens", best.tokens)
        out += [make_run(spec, stage, best.model, budget, best.optimizer, {**best.settings, "lr": float(f"{lr:.4g}")},
                         best.axes or ("lr",), seed) for seed in stage.seeds]
    return out


def plan(spec: Spec, settled: Callable[[StudyRun], bool]) -> tuple[dict[str, list[StudyRun]], dict[str, str]]:
    """Every stage's runs (as far as known) and, per stage, why more may follow."""
    planned: dict[str, list[StudyRun]] = {}
    pending: dict[str, str] = {}
    for stage in spec.stages:
        planned[stage.name], why = stage_runs(spec, stage, planned, settled)
        if why:
            pending[stage.name] = why
    return planned, pending


def _done(run: StudyRun) -> bool:
    return run_status(run.directory) == "done"


def measure_rate(run: StudyRun, updates: int = 2) -> float:
    """Training tokens/s of this run's model and optimizer: `updates` timed updates (after one untimed) on random
    tokens, in this process, with the run's batch, length, dtype and optimizer settings."""
    import torch

    from train.build import build_optimizer
    from train.model import build_model

    config = _resolve_run(run)
    torch.manual_seed(0)
    model = build_model(config.model_config, dtype=config.dtype, device="cpu")
    optimizer = build_optimizer(model, config)
    ids = torch.randint(model.config.vocab_size, (config.batch_size, config.max_length))

    def update() -> None:
        for _ in range(config.gradient_accumulation):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update()
    start = time.perf_counter()
    for _ in range(updates):
        update()
    return updates * config.total_batch_size * config.max_length / (time.perf_counter() - start)


def estimate_seconds(runs: list[StudyRun], rates: dict[tuple[str, str], float], startup_s: float) -> float:
    """Time of the runs not finished yet: training tokens at the measured rate, each evaluation's tokens at a third
    of a training token's time (forward only), and a start-up per run."""
    total = 0.0
    for run in runs:
        if not _done(run):
            config = _resolve_run(run)
            rate = rates[(run.model, run.optimizer)]
            evals = math.ceil(run.steps / config.eval_every)
            total += startup_s + run.tokens / rate + evals * config.eval_tokens / (3 * rate)
    return total


def measure_rates(spec: Spec, runs: list[StudyRun], how: str) -> dict[tuple[str, str], float]:
    """(model, optimizer) -> training tokens/s. 'all': every pair measured; 'smallest': every optimizer on the
    smallest model, and on a larger model its rate there times (AdamW's rate on that model / on the smallest)."""
    first: dict[tuple[str, str], StudyRun] = {}
    for run in runs:
        first.setdefault((run.model, run.optimizer), run)
    measured: dict[tuple[str, str], float] = {}

    def rate(pair: tuple[str, str]) -> float:
        if pair not in measured:
            print(f"# measuring {pair[1]} on {pair[0]} ({first[pair].name}) ...", file=sys.stderr, flush=True)
            measured[pair] = measure_rate(first[pair])
        return measured[pair]

    smallest = min({m for m, _ in first}, key=lambda m: _sizes(spec, m)[0]) if first else None
    out = {}
    for model, optimizer in sorted(first):
        if how == "all" or model == smallest or (smallest, optimizer) not in first:
            out[(model, optimizer)] = rate((model, optimizer))
        else:
            base = apollo.BASELINE  # scaled by the AdamW baseline's rate ratio where it ran at both sizes
            ref = base if (model, base) in first and (smallest, base) in first else optimizer
            out[(model, optimizer)] = rate((smallest, optimizer)) * rate((model, ref)) / rate((smallest, ref))
    return out


def _placeholders(spec: Spec, stage: Stage) -> list[StudyRun]:
    """Stand-ins for a `from` stage not chosen yet (each optimizer's first grid point): their tokens and rates."""
    return [grid_runs(spec, dataclasses.replace(stage, seeds=[seed]), model, budget, optimizer)[0]
            for model, budget, optimizer in itertools.product(stage.models, stage.budgets, stage.optimizers)
            for _ in range(stage.top) for seed in stage.seeds]


def print_plan(spec: Spec, *, rate: float | None, measure: str, startup_s: float) -> None:
    """The plan (stdout, '#' lines), every known command (one per line), and slurm.sh in the study folder."""
    planned, pending = plan(spec, _done)
    stand_ins = {s.name: _placeholders(spec, s) for s in spec.stages if s.name in pending and not planned[s.name]}
    every = [r for runs in planned.values() for r in runs] + [r for runs in stand_ins.values() for r in runs]
    rates = ({(r.model, r.optimizer): rate for r in every} if rate else measure_rates(spec, every, measure))
    source = f"{rate:,.0f} tokens/s given (--rate)" if rate else (
        f"measured here ({measure}: 2 updates after 1, random tokens): "
        + "; ".join(f"{m} {o} {v:,.0f}" for (m, o), v in sorted(rates.items())))
    print(f"# study {spec.path} -> {spec.out}\n# training rates, tokens/s: {source}")
    seen: set[str] = set()
    lines, total_runs, total_tokens, total_s, extra_s = [], 0, 0, 0.0, 0.0
    for stage in spec.stages:
        runs = [r for r in planned[stage.name] if r.name not in seen]
        seen.update(r.name for r in runs)
        known = runs or stand_ins.get(stage.name, [])
        seconds, tokens = estimate_seconds(known, rates, startup_s), sum(r.tokens for r in known)
        finished = sum(_done(r) for r in runs)
        note = f"; {pending[stage.name]}" if stage.name in pending else ""
        print(f"# stage {stage.name}: {len(known)} runs ({finished} finished), {tokens:,} tokens, "
              f"about {seconds / 3600:.2f} h{note}")
        if stage.extend_edges:  # at most one more lr per grid cell and seed per extension
            cells = {(r.model, r.tokens, r.optimizer, tuple(sorted((k, v) for k, v in r.settings.items() if k != "lr")))
                     for r in known}
            extra_s += stage.extend_edges * len(stage.seeds) * sum(
                estimate_seconds([next(r for r in known if (r.model, r.tokens, r.optimizer) == c[:3])], rates, startup_s)
                for c in cells)
        total_runs, total_tokens, total_s = total_runs + len(known), total_tokens + tokens, total_s + seconds
        lines += [("# done: " if _done(r) else "") + shlex.join(command("train", [], r, run_status(r.directory) == "partial"))
                  for r in runs]
        if not runs and stage.name in stand_ins:
            lines.append(f"# stage {stage.name}: {pending[stage.name]}; run --print again then for their commands")
    print(f"# total: {total_runs} runs, {total_tokens:,} tokens, about {total_s / 3600:.2f} h on this machine"
          + (f" (+ up to {extra_s / 3600:.2f} h if every grid is extended at an edge)" if extra_s else "")
          + f"; {startup_s:g} s start-up per run assumed, evaluation at 1/3 of a training token")
    print("# commands, one per line ('# done:' finished; a resumed run ends with --continue_from):")
    print("\n".join(lines))
    path = write_slurm(spec, {s.name: len(planned[s.name]) or len(stand_ins.get(s.name, [])) for s in spec.stages})
    print(f"# wrote {path}: a SLURM job array per stage (its header says how to submit them)")


def write_slurm(spec: Spec, sizes: dict[str, int]) -> Path:
    """out/slurm.sh: task I of stage S runs `python -m train.study SPEC --stage S --index I` (skip / resume)."""
    spec.out.mkdir(parents=True, exist_ok=True)
    submit, previous = [], None
    for stage in spec.stages:
        dependency = f" --dependency=afterany:${previous}" if previous else ""
        submit.append(f"#   j{len(submit) + 1}=$(sbatch --parsable --array=0-{sizes[stage.name] - 1}{dependency} "
                      f"{spec.out / 'slurm.sh'} {stage.name})")
        previous = f"j{len(submit)}"
    edges = [s.name for s in spec.stages if s.extend_edges]
    text = "\n".join([
        "#!/bin/bash",
        f"# SLURM job arrays of the study {spec.path} (written by python -m train.study --print).",
        "# One array task is one run: python -m train.study SPEC --stage STAGE --index I (a finished run is skipped,",
        "# an interrupted one resumed). Submit the stages in order, each after the one before:",
        *submit,
        *([f"# Stages with extend_edges ({', '.join(edges)}): after their array, run python -m train.study SPEC "
           "--stage NAME once to add the lrs beyond a grid edge."] if edges else []),
        f"#SBATCH --job-name=study-{spec.path.stem}",
        f"#SBATCH --output={spec.out}/slurm-%A_%a.out",
        "#SBATCH --cpus-per-task=2",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f'exec {shlex.quote(sys.executable)} -m train.study {shlex.quote(str(spec.path))} --stage "$1" '
        '--index "$SLURM_ARRAY_TASK_ID"', ""])
    path = spec.out / "slurm.sh"
    path.write_text(text, encoding="utf-8")
    return path


def run_study(spec: Spec, *, stage: str | None = None, index: int | None = None,
              launch: Callable[[list[str]], int] | None = None) -> int:
    """Run the stages (or one, or one run of one) here, one run after another; returns the number that failed."""
    failed: set[str] = set()
    attempted: set[str] = set()
    for current in [s for s in spec.stages if stage in (None, s.name)]:
        while True:
            planned, pending = plan(spec, lambda r: _done(r) or r.name in failed)
            runs = planned[current.name]
            if index is not None:
                if index >= len(runs):
                    raise StudyError(f"stage {current.name} has {len(runs)} runs now, no index {index}"
                                     + (f" ({pending[current.name]})" if current.name in pending else ""))
                runs = runs[index:index + 1]
            todo = list({r.name: r for r in runs if r.name not in attempted}.values())
            if not todo:
                break
            for position, run in enumerate(todo, 1):
                attempted.add(run.name)
                if not execute("train", [], run, f"[{current.name} {position}/{len(todo)}]", launch):
                    failed.add(run.name)
        if current.name in pending and not runs:
            print(f"study: stage {current.name}: {pending[current.name]}", file=sys.stderr)
            failed.add(current.name)
    if index is None:
        rebuild_report(spec)
    if failed:
        print(f"study: {len(failed)} runs or stages did not finish: {', '.join(sorted(failed))}", file=sys.stderr)
    return len(failed)


def rebuild_report(spec: Spec) -> None:
    """report.md + PNGs of the study from its run folders (train/study/report.py); a study without
    finished runs says so on stderr."""
    try:
        path = write_report(spec.out, memory_device=spec.memory_device, title=spec.path.stem)
        print(f"study: wrote {path}", file=sys.stderr)
    except ValueError as error:
        print(f"study: no report: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.splitlines()[0],
                                     epilog="The spec format: train/study/__init__.py's docstring and "
                                            "scripts/studies/example.toml.")
    parser.add_argument("spec", help="a study spec (TOML)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the plan and commands, run nothing")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the run folders")
    parser.add_argument("--stage", default=None, help="run only this stage")
    parser.add_argument("--index", type=int, default=None, help="with --stage: run only its run number INDEX (0-based)")
    parser.add_argument("--rate", type=float, default=None, metavar="TOKENS_PER_S",
                        help="--print: assume this training rate instead of measuring")
    parser.add_argument("--measure", choices=("all", "smallest"), default="all",
                        help="--print: measure every optimizer on every model (default), or on the smallest model only "
                             "and scale by AdamW's rate on the others (quicker; wrong where an optimizer's cost grows "
                             "faster than AdamW's, e.g. Muon's bfloat16 Newton-Schulz on a CPU)")
    parser.add_argument("--startup_s", type=float, default=20.0, help="--print: seconds of start-up per run")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.stage is not None and args.stage not in {s.name for s in spec.stages}:
            raise StudyError(f"--stage {args.stage}: no such stage ({', '.join(s.name for s in spec.stages)})")
        if args.index is not None and (args.stage is None or args.index < 0):
            raise StudyError("--index needs --stage and is 0 or more")
        if args.rate is not None and not args.rate > 0:
            raise StudyError(f"--rate must be > 0, got {args.rate}")
        if args.report:
            rebuild_report(spec)
            return 0
        if args.print_only:
            print_plan(spec, rate=args.rate, measure=args.measure, startup_s=args.startup_s)
            return 0
        return 1 if run_study(spec, stage=args.stage, index=args.index) else 0
    except StudyError as error:
        print(f"study: {error}", file=sys.stderr)
        return 2



report = rebuild_report  # its name when train/study.py was one module (train.study.report is now the report module)
