"""The report of a study (train/study/), rebuilt from its run folders alone (config.json + metrics.jsonl).

    python -m train.study.report STUDY_DIR [--memory_device cpu]     # reads STUDY_DIR/runs/*, writes STUDY_DIR/report.md

What counts: each run's validation loss at its last update (the evaluation the trainer always makes at
the end, after the full lr decay), never the best point along the way; a run without that evaluation
is listed as unfinished and left out. Runs are grouped by model (config's `model_config`) and budget
(num_training_steps x total_batch_size x max_length tokens); inside a group, by optimizer and
configuration (every config value except seeds, names, paths and logging); a configuration's loss is
the mean over its seeds, and an optimizer's configurations are ranked on the seeds they all have (so a
winner re-run at a second seed is not penalised for the extra draw). For each model and budget the best configuration of each optimizer gets one
row: final validation loss, perplexity and bits per byte (mean over seeds), optimizer-state bytes (as
logged by the run), the memory estimate of `train.memory.estimate` for that run's settings, and the
median training tokens/s. Then: the seeds of each configuration run more than once (spread), a
loss-vs-lr plot per optimizer (a warning where the best lr is the smallest or largest one tried),
curves of the best runs, and the speedup in tokens over AdamW where AdamW has runs at three or more
budgets of a model.

Speedup (PEERS.md, "How to compare them fairly"): AdamW's final loss of its best configuration at each
budget D fitted as L(D) = alpha D^(-B) + beta (train/study/fit.py); an optimizer that reaches loss L with
D tokens has speedup D_AdamW(L) / D with D_AdamW(L) = (alpha / (L - beta))^(1/B).

Every number computed from these runs is "measured"; the published perplexities shown for reference
(PROTOCOL.md, PEERS.md) are "reported".
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import apollo
from apollo.registry import RegistryView
from train.adapters import choice as adapter_choice, row_label
from train.compare import RunError, load_run, smooth
from train.config import TrainConfig
from train.study.fit import PowerLawFit, fit_power_law

#: every TrainConfig field's default: what a saved config that predates a field ran with
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
#: config keys that do not make a configuration (seeds are averaged over; the rest is naming and logging)
IGNORED = frozenset({"seed", "data_seed", "save_dir", "name", "continue_from", "wandb", "project", "entity",
                     "workers", "dry_run", "log_every", "eval_every", "save_every", "keep_last", "eval_batch_size",
                     "nan_policy"})



def reported() -> dict[str, dict[str, float]]:
    """The published validation perplexities (reported), for reference only: source -> {optimizer: perplexity},
    gathered from every registered spec's ``published`` (sources in the order the registry first cites them)."""
    sources: dict[str, dict[str, float]] = {}
    for spec in apollo.REGISTRY.values():
        for source, perplexity in spec.published.items():
            sources.setdefault(source, {})[spec.name] = perplexity
    return sources


#: `reported()` as a read-only mapping (the name this table had when it was written out here)
REPORTED = RegistryView(reported)


@dataclass
class Result:
    """One run folder: its resolved config and what the report needs from its metrics."""

    directory: Path
    config: dict[str, Any]
    final: dict[str, float] | None  # eval/* at the last update; None: the run has not finished
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, validation loss)
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, training loss)
    state_bytes: int | None = None
    tokens_per_second: float | None = None

    @property
    def name(self) -> str:
        return self.config.get("name") or self.directory.name

    @property
    def model(self) -> str:
        return Path(self.config["model_config"]).stem

    @property
    def tokens(self) -> int:
        c = self.config
        return c["num_training_steps"] * c["total_batch_size"] * c["max_length"]

    @property
    def loss(self) -> float | None:
        return self.final.get("eval/loss") if self.final else None

    @property
    def settings(self) -> tuple:
        return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in self.config.items()
                            if k not in IGNORED))


def load_result(directory: str | Path) -> Result | None:
    """The run in `directory`, or None when it holds no metrics.jsonl and config.json yet."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return None
    try:
        run = load_run(directory)
    except RunError:
        return None
    steps = run.config["num_training_steps"]
    final = next((values for step, values in run.eval_metrics if step == steps), None)
    curve = [(tokens, values.get("eval/loss", math.log(ppl)))
             for (tokens, ppl), (_, values) in zip(run.evals, run.eval_metrics)]
    # a run saved before a flag existed ran with its default: the same configuration as a newer run that left it
    config = {**_TRAIN_DEFAULTS, **run.config}
    return Result(directory, config, final, curve, run.train, run.state_bytes, run.tokens_per_second)


def load_results(runs_dir: str | Path) -> list[Result]:
    """Every run folder under `runs_dir` (folders moved aside by train.sweep, *.failed-N, are not runs)."""
    folders = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and ".failed-" not in p.name)
    return [r for r in map(load_result, folders) if r is not None]


@dataclass
class Group:
    """One configuration of one optimizer at one model and budget: its finished runs (one per seed)."""

    results: list[Result]
    selection: float = math.nan  # the loss that ranks it among its optimizer's configurations (_ranked)

    @property
    def loss(self) -> float:
        return statistics.fmean(r.loss for r in self.results)

    def mean(self, key: str) -> float | None:
        values = [r.final.get(key) for r in self.results]
        return statistics.fmean(values) if values and None not in values else None

    @property
    def lr(self) -> float:
        return self.results[0].config["lr"]

    @property
    def config(self) -> dict[str, Any]:
        return self.results[0].config


def cells(results: list[Result]) -> dict[tuple[str, int], dict[str, list[Group]]]:
    """(model, tokens) -> optimizer -> its configurations, best (lowest mean final loss) first; finished runs only."""
    grouped: dict[tuple[str, int], dict[str, dict[tuple, list[Result]]]] = {}
    for r in results:
        if r.loss is not None:
            by_optimizer = grouped.setdefault((r.model, r.tokens), {})
            by_optimizer.setdefault(row_label(r.config), {}).setdefault(r.settings, []).append(r)  # adamw+lora apart
    return {cell: {opt: _ranked([Group(rs) for rs in configs.values()]) for opt, configs in sorted(by_opt.items())}
            for cell, by_opt in sorted(grouped.items())}


def _ranked(groups: list[Group]) -> list[Group]:
    """Best first, compared on the seeds every configuration has (a configuration re-run at more seeds because it
    won is not penalised for the extra draws); on all of each one's seeds where they share none."""
    common = set.intersection(*({r.config["seed"] for r in g.results} for g in groups))
    for g in groups:
        shared = [r.loss for r in g.results if r.config["seed"] in common]
        g.selection = statistics.fmean(shared) if shared else g.loss
    return sorted(groups, key=lambda g: g.selection)


def varying_keys(groups: list[Group]) -> list[str]:
    """Config keys whose value differs between these configurations (lr first)."""
    keys = {k for g in groups for k in g.config if k not in IGNORED and
            len({repr(h.config.get(k)) for h in groups}) > 1}
    return sorted(keys, key=lambda k: (k != "lr", k))


def label(group: Group, keys: list[str]) -> str:
    return ", ".join(f"{k} {group.config.get(k):g}" if isinstance(group.config.get(k), float)
                     else f"{k} {group.config.get(k)}" for k in (keys or ["lr"]))


def edge_warning(best: Group, groups: list[Group]) -> str | None:
    """A warning when the best lr is the smallest or largest lr tried with the same other settings."""
    others = [g for g in groups if _without_lr(g) == _without_lr(best)]
    lrs = sorted({g.lr for g in others})
    if len(lrs) < 2 or lrs[0] < best.lr < lrs[-1]:
        return None
    edge = "smallest" if best.lr == lrs[0] else "largest"
    return f"best lr {best.lr:g} is the {edge} of {', '.join(f'{x:g}' for x in lrs)}: widen the grid"


def _without_lr(group: Group) -> tuple:
    return tuple(item for item in group.results[0].settings if item[0] != "lr")


# ------------------------------------------------------------------------------------------ the report


def _tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def memory_estimate(config: dict[str, Any], device: str) -> float | None:
    """train.memory.estimate's total (bytes) for the run's settings, as `python -m train --dry_run` computes it."""
    from train.memory import estimate

    try:
        takes_rank = "rank" in apollo.get_spec(config["optimizer"]).options
        return estimate(config["model_config"], optimizer=config["optimizer"], batch_size=config["batch_size"],
                        max_length=config["max_length"], rank=config.get("rank") if takes_rank else None,
                        activation_checkpointing=config.get("activation_checkpointing", False), dtype=config["dtype"],
                        state_dtype=config.get("state_dtype"), packing=config.get("packing", False),
                        weight_quant=config.get("weight_quant", False), layerwise=config.get("layerwise", False),
                        device=device, adapter=adapter_choice(config)).total
    except (ValueError, OSError, KeyError) as error:
        print(f"study report: no memory estimate for {config.get('name')}: {error}", file=sys.stderr)
        return None


def _parameters(model_config: str) -> int | None:
    from train.model import build_model

    try:
        return sum(p.numel() for p in build_model(model_config, device="meta").parameters())
    except (ValueError, OSError):
        return None


def speedups(table: dict[str, list[Group]], adamw_fit: PowerLawFit) -> list[tuple[str, float, float, float]]:
    """(optimizer, its tokens D, its loss L, D_AdamW(L) / D) for the best configuration of each optimizer."""
    rows = []
    for optimizer, groups in table.items():
        best = groups[0]
        tokens = best.results[0].tokens
        rows.append((optimizer, tokens, best.loss, adamw_fit.tokens_for(best.loss) / tokens))
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(table: dict[str, list[Group]], path: Path, title: str) -> None:
    plt = _plt()
    figure, (val, train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for optimizer, groups in table.items():
        run = groups[0].results[0]
        if run.curve:
            val.plot(*zip(*run.curve), marker="o", markersize=3, label=f"{optimizer} ({label(groups[0], ['lr'])})")
        if run.train:
            tokens, loss = zip(*run.train)
            train.plot(tokens, smooth(list(loss), 0.9), label=optimizer)
    val.set(xlabel="tokens", ylabel="validation loss (nats)", title="validation loss, best run per optimizer")
    train.set(xlabel="tokens", ylabel="training loss (EMA 0.9)", title="training loss")
    for axis in (val, train):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sensitivity(all_cells: dict, path: Path) -> None:
    """One panel per optimizer: final validation loss (mean over seeds) against lr, one line per model/budget/setting."""
    plt = _plt()
    optimizers = sorted({opt for table in all_cells.values() for opt in table})
    columns = min(4, len(optimizers))
    rows = math.ceil(len(optimizers) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, optimizer in zip(axes.flat, optimizers):
        for (model, tokens), table in all_cells.items():
            groups = table.get(optimizer, [])
            lines: dict[tuple, list[Group]] = {}
            for g in groups:
                lines.setdefault(_without_lr(g), []).append(g)
            keys = [k for k in varying_keys(groups) if k != "lr"]
            for members in lines.values():
                members = sorted(members, key=lambda g: g.lr)
                extra = f" {label(members[0], keys)}" if keys else ""
                axis.plot([g.lr for g in members], [g.loss for g in members], marker="o",
                          label=f"{model} {_tokens(tokens)}{extra}")
        axis.set(xscale="log", xlabel="peak lr", ylabel="final val loss", title=optimizer)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(optimizers):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_fit(fit: PowerLawFit, others: list[tuple[str, float, float, float]], path: Path, title: str) -> None:
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    grid = np.geomspace(min(fit.tokens) / 2, max(fit.tokens) * 2, 100)
    axis.plot(grid, [fit(d) for d in grid], "k--", label=f"AdamW fit {fit.alpha:.3g} D^-{fit.exponent:.3g} + {fit.beta:.3g}")
    axis.plot(fit.tokens, fit.losses, "ko", label="AdamW (measured)")
    for optimizer, tokens, loss, _ in others:
        if optimizer != apollo.BASELINE:
            axis.plot([tokens], [loss], "o", label=optimizer)
    axis.set(xscale="log", xlabel="tokens D", ylabel="final validation loss", title=title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(study_dir: str | Path, *, memory_device: str = "cuda", title: str | None = None) -> Path:
    """Read `study_dir`/runs/*, write report.md and its PNGs into `study_dir`; returns the report's path."""
    study_dir = Path(study_dir)
    results = load_results(study_dir / "runs")
    if not results:
        raise RunError(f"{study_dir / 'runs'}: no run folders with metrics yet")
    all_cells = cells(results)
    out = [f"# Study report: {title or study_dir.name}", "",
           f"Rebuilt from the {len(results)} run folders in `{study_dir / 'runs'}` (config.json + metrics.jsonl): "
           f"`python -m train.study.report {study_dir}`. Every number is **measured** on these runs unless marked "
           "**reported**. Ranked by the validation loss at the last update (after the full decay), mean over seeds.", ""]
    unfinished = [r.name for r in results if r.loss is None]
    if unfinished:
        out += [f"Unfinished (no evaluation at the last update; left out): {', '.join(unfinished)}", ""]
    params = {m: _parameters(m) for m in {r.config["model_config"] for r in results}}
    warnings = []
    for (model, tokens), table in all_cells.items():
        first = next(iter(table.values()))[0].results[0]
        n = params.get(first.config["model_config"])
        per_param = f", {tokens / n:.3g} tokens per parameter" if n else ""
        out += [f"## {model}, {_tokens(tokens)} tokens ({first.config['num_training_steps']:,} update(s) of "
                f"{first.config['total_batch_size']} x {first.config['max_length']}{per_param})", "",
                f"| optimizer | best configuration | seeds | final val loss (measured) | final ppl | bits/byte | "
                f"optimizer state MB | memory estimate GB ({memory_device}) | tokens/s | run |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for optimizer, groups in sorted(table.items(), key=lambda item: item[1][0].loss):
            best, keys = groups[0], varying_keys(groups)
            run = best.results[0]
            memory = memory_estimate(best.config, memory_device)
            rate = [r.tokens_per_second for r in best.results if r.tokens_per_second]
            out.append(f"| {optimizer} | {label(best, keys)} | {len(best.results)} | {best.loss:.4f} | "
                       f"{_num(best.mean('eval/perplexity'), '.2f')} | {_num(best.mean('eval/bits_per_byte'), '.4f')} | "
                       f"{_num(None if run.state_bytes is None else run.state_bytes / 2**20, '.2f')} | "
                       f"{_num(None if memory is None else memory / 1e9, '.3f')} | "
                       f"{_num(statistics.median(rate) if rate else None, ',.0f')} | {run.name} |")
            warning = edge_warning(best, groups)
            if warning:
                warnings.append(f"{model} {_tokens(tokens)} {optimizer}: {warning}")
            elif len({g.lr for g in groups}) < 2:
                warnings.append(f"{model} {_tokens(tokens)} {optimizer}: one lr only (not tuned at this model/budget)")
        png = f"curves_{model}_{_tokens(tokens)}.png"
        plot_curves(table, study_dir / png, f"{model}, {_tokens(tokens)} tokens")
        out += ["", f"![curves]({png})", ""]
    out += ["## Learning-rate sensitivity", "", "![sensitivity](sensitivity.png)", ""]
    plot_sensitivity(all_cells, study_dir / "sensitivity.png")
    out += [f"- {w}" for w in warnings] or ["- every best lr lies inside its grid"]
    out += ["", *seed_section(all_cells), *speedup_section(all_cells, study_dir), *reported_section(all_cells)]
    path = study_dir / "report.md"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def seed_section(all_cells: dict) -> list[str]:
    rows = []
    for (model, tokens), table in all_cells.items():
        for optimizer, groups in table.items():
            for g in groups:
                if len(g.results) > 1:
                    losses = [r.loss for r in g.results]
                    seeds = ", ".join(f"{r.config['seed']}: {r.loss:.4f}" for r in g.results)
                    rows.append(f"| {model} | {_tokens(tokens)} | {optimizer} | {label(g, varying_keys(groups))} | "
                                f"{seeds} | {statistics.fmean(losses):.4f} | {statistics.stdev(losses):.4f} | "
                                f"{max(losses) - min(losses):.4f} |")
    if not rows:
        return ["## Seeds", "", "No configuration was run with more than one seed.", ""]
    return ["## Seeds (final val loss, measured)", "",
            "| model | budget | optimizer | configuration | loss per seed | mean | std | range |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def speedup_section(all_cells: dict, study_dir: Path) -> list[str]:
    out = ["## Speedup in tokens over AdamW", ""]
    for model in sorted({m for m, _ in all_cells}):
        budgets = {t: table[apollo.BASELINE][0] for (m, t), table in all_cells.items()
                   if m == model and apollo.BASELINE in table}
        if len(budgets) < 3:
            out += [f"{model}: AdamW has final losses at {len(budgets)} budget(s) "
                    f"({', '.join(_tokens(t) for t in sorted(budgets)) or 'none'}); the fit needs 3 or more.", ""]
            continue
        tokens = sorted(budgets)
        fit = fit_power_law(tokens, [budgets[t].loss for t in tokens])
        exact = " (3 points, 3 parameters: an exact fit, the residuals say nothing)" if len(tokens) == 3 else ""
        out += [f"{model}: AdamW's best final loss per budget fitted as L(D) = {fit.alpha:.4g} D^-{fit.exponent:.4g} "
                f"+ {fit.beta:.4g}{exact}.", "", "| D (tokens) | AdamW loss (measured) | fit | residual |", "|---|---|---|---|"]
        out += [f"| {d:,.0f} | {loss:.4f} | {fit(d):.4f} | {res:+.2e} |"
                for d, loss, res in zip(fit.tokens, fit.losses, fit.residuals)]
        rows = [row for (m, t), table in all_cells.items() if m == model for row in speedups(table, fit)]
        out += ["", "| optimizer | D | final loss | D_AdamW(L) | speedup D_AdamW(L)/D |", "|---|---|---|---|---|"]
        for optimizer, d, loss, speedup in sorted(rows, key=lambda r: (r[1], -r[3])):
            d_adamw = fit.tokens_for(loss)
            inside = min(tokens) * (1 - 1e-6) <= d_adamw <= max(tokens) * (1 + 1e-6)
            note = "" if inside else " (extrapolated beyond AdamW's budgets)"
            shown = "below the fit's floor beta" if math.isinf(d_adamw) else f"{d_adamw:,.0f}"
            out.append(f"| {optimizer} | {d:,.0f} | {loss:.4f} | {shown} | {_num(speedup, '.2f')}x{note} |")
        png = f"speedup_{model}.png"
        plot_fit(fit, rows, study_dir / png, f"{model}: final loss against tokens")
        out += ["", f"![speedup]({png})", ""]
    return out


def reported_section(all_cells: dict) -> list[str]:
    out = ["## Published numbers for reference (reported, not run here)", ""]
    for source, numbers in reported().items():
        ordered = " < ".join(f"{opt} {ppl:.2f}" for opt, ppl in sorted(numbers.items(), key=lambda t: t[1]))
        out.append(f"- {source}, validation perplexity (reported): {ordered}")
        for (model, tokens), table in all_cells.items():
            here = {opt: table[opt][0].mean("eval/perplexity") for opt in numbers if opt in table}
            if len(here) >= 2 and None not in here.values():
                order = " < ".join(f"{opt} {ppl:.2f}" for opt, ppl in sorted(here.items(), key=lambda t: t[1]))
                out.append(f"  - the same optimizers at {model} {_tokens(tokens)} (measured): {order}")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.study.report", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="a study folder (its runs/ subfolder holds the run folders)")
    parser.add_argument("--memory_device", default="cuda", choices=("cuda", "cpu"), help="device of the memory estimate")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        path = write_report(args.study_dir, memory_device=args.memory_device, title=args.title)
    except RunError as error:
        print(f"study report: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
