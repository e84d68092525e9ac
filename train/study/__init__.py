"""Fair optimizer comparisons: a study spec -> a plan of runs -> the runs -> a report (train/study/report.py).

    python -m train.study SPEC --print [--rate TOKENS_PER_S]   # the plan, its time, every command; writes slurm.sh
    python -m train.study SPEC                                  # run every stage here, one run after another
    python -m train.study SPEC --stage NAME [--index I]         # one stage (or its I-th run: a SLURM array task)
    python -m train.study SPEC --report                         # rebuild report.md + PNGs from the run folders

The spec is TOML (tomllib); scripts/studies/example.toml is a documented example. Paths are relative
to the folder you run from (the repository root), as for `python -m train`. Top-level keys:

    out = "runs/studies/NAME"     the study folder: run folders in out/runs/<run>, report.md, slurm.sh
    seeds = [0]                   default seeds of every stage; a run with seed S gets --seed S --data_seed S
    warmup_fraction = 0.1         --warmup_steps round(fraction x updates), unless [common] gives warmup_steps
    evals = 2                     --eval_every updates // evals (the trainer also evaluates at the end)
    saves = 2                     --save_every ceil(updates / saves): checkpoints to resume an interrupted run
    memory_device = "cuda"        device of the report's memory estimate (train.memory.estimate): cuda | cpu
    [models]                      name = LLaMA config json, e.g. 9m = "configs/llama_9m.json"
    [common]                      trainer flags of every run, named as in `python -m train --help` without the
                                  dashes; true is a switch (packing = true); e.g. data_dir, tokenizer, max_length,
                                  batch_size, total_batch_size, scheduler, decay_fraction, eval_tokens
    [optimizers.NAME]             one table per optimizer (apollo.optimizer_names()): a list is a grid axis,
                                  a single value a flag of that optimizer's runs; lr is required
                                  (lr = [1e-3, 2e-3, 4e-3]; rank = [16, 32]; update_proj_gap = 25);
                                  or a row of its own name: an optimizer plus model-side flags, e.g.
                                  [optimizers.lora] optimizer = "adamw", adapter = "lora", lora_rank = 128
                                  (runs are named by the row; the report labels it adamw+lora)
    [[stages]]                    run in order; keys:
        name                      letters, digits, _ and -
        models                    names from [models] (default: all)
        budgets                   training tokens per run, e.g. ["100K", 400000] (K/M/B suffixes);
        tokens_per_param          or budgets as multiples of each model's parameter count (all parameters)
        optimizers                names from [optimizers] (default: all); each runs its whole grid
        seeds                     (default: the top-level seeds)
        from = "STAGE"            instead of the grids: the `top` best configurations (default 1) of each
                                  optimizer in that earlier stage, by final validation loss (mean over seeds),
                                  taken at the same model and budget where it has them, else at its first
        extend_edges = N          after the stage's runs: where an optimizer's best lr is the smallest or largest
                                  of its grid, run one more lr beyond it (the grid's ratio), up to N times

A run's flags are [common], the derived warmup/eval/save steps, its model, optimizer, grid values,
--num_training_steps budget // (total_batch_size x max_length), its seeds, and --save_dir/--name
(train.sweep.command). Runs are named <model>-<budget>-<optimizer>-<grid values>-s<seed>; a run
that two stages share runs once. A bad spec (unknown key or optimizer, empty grid, a missing config,
a budget under one update, a flag the optimizer does not take, a value the trainer refuses) exits 2
with one line before anything runs. Running goes through train.sweep.execute: finished runs are
skipped, interrupted ones resumed.

The package: spec.py (parse and check a spec, a stage's grid of runs), run.py (the plan, its time, the
runs, the command line), report.py (report.md from the run folders), fit.py (the scaling-law fit behind
the speedups). Every name the old module train/study.py had is importable from train.study.
"""
import importlib

#: where each name the old module train/study.py had now lives (loaded on first use, so that
#: `python -m train.study.report` does not find its module already imported by this package)
_HOMES = {
    "fit": ("PowerLawFit", "fit_power_law"),
    "report": ("load_result", "write_report"),
    "run": ("_done", "_loss", "_mean_losses", "_placeholders", "edge_runs", "estimate_seconds", "main", "measure_rate",
            "measure_rates", "plan", "print_plan", "rebuild_report", "run_study", "stage_runs", "write_slurm"),
    "spec": ("Spec", "Stage", "StudyError", "StudyRun", "_resolve_run", "_sizes", "grid_runs", "load_spec", "make_run"),
    "train.sweep": ("command", "execute", "run_status"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(name for name in _HOME if not name.startswith("_"))


def __getattr__(name: str):
    if name in ("fit", "report", "run", "spec"):
        return importlib.import_module(f"train.study.{name}")
    if name not in _HOME:
        raise AttributeError(f"module 'train.study' has no attribute {name!r}")
    home = _HOME[name]
    return getattr(importlib.import_module(home if "." in home else f"train.study.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME, "fit", "report", "run", "spec"])
