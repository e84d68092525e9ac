"""Compare runs: validation perplexity and smoothed training loss against tokens (PNG), and a markdown table.

    python -m train.compare RUN_DIR [RUN_DIR ...] --out comparison/ [--title "..."] [--smoothing 0.9]

A run directory is what `python -m train` writes: `config.json` (the resolved TrainConfig) and
`metrics.jsonl` (one record per update: loss, lr, tokens_seen, throughput_tokens, ...; one per
evaluation: eval/loss, eval/perplexity). A wandb offline folder inside a run directory
(`<run>/wandb/offline-run-*`) is accepted and read through its run directory's metrics.jsonl.
A directory without metrics, or a run without evaluations, gets one line on stderr; the other runs
are still plotted and tabled.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apollo


class RunError(ValueError):
    """A run directory that cannot be compared; the message names the path."""


@dataclass
class Run:
    """What the comparison needs from one run directory."""

    name: str
    directory: Path
    config: dict[str, Any]
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, perplexity)
    throughputs: list[float] = field(default_factory=list)
    state_bytes: int | None = None
    eval_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, every eval/* value)

    @property
    def final_perplexity(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def best_perplexity(self) -> float | None:
        return min(p for _, p in self.evals) if self.evals else None

    @property
    def tokens(self) -> int:
        return self.train[-1][0] if self.train else 0

    @property
    def tokens_per_second(self) -> float | None:
        return statistics.median(self.throughputs) if self.throughputs else None


def _run_directory(path: Path) -> Path:
    """The run directory of `path`: itself, or the run that holds a wandb offline folder."""
    if (path / "metrics.jsonl").is_file():
        return path
    for parent in path.parents:
        if parent.name == "wandb" and (parent.parent / "metrics.jsonl").is_file():
            return parent.parent
    raise RunError(f"{path}: no metrics.jsonl (not a run directory written by python -m train)")


def load_run(path: str | Path) -> Run:
    """Read one run directory (or a wandb offline folder inside one). RunError if it holds no metrics."""
    directory = _run_directory(Path(path))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    run = Run(name=config.get("name") or directory.name, directory=directory, config=config)
    # keyed by step, so that a resumed run (which logs again the steps after its checkpoint) keeps only
    # the records of its final timeline
    train: dict[int, tuple[int, float]] = {}
    evals: dict[int, float] = {}
    eval_records: dict[int, dict[str, float]] = {}
    tokens_at_step: dict[int, int] = {}
    with open(directory / "metrics.jsonl", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise RunError(f"{directory / 'metrics.jsonl'}:{number}: not a json line") from None
            step = record.get("step", 0)
            if record.get("loss") is not None:
                if train and step <= max(train):  # a resumption: forget what came after its checkpoint
                    train = {k: v for k, v in train.items() if k < step}
                    evals = {k: v for k, v in evals.items() if k < step}
                    eval_records = {k: v for k, v in eval_records.items() if k < step}
                train[step] = (record.get("tokens_seen", 0), record["loss"])
            if "tokens_seen" in record:
                tokens_at_step[step] = record["tokens_seen"]
            if record.get("throughput_tokens") is not None:
                run.throughputs.append(record["throughput_tokens"])
            if record.get("optimizer_state_bytes") is not None:
                run.state_bytes = record["optimizer_state_bytes"]
            if record.get("eval/perplexity") is not None:
                evals[step] = record["eval/perplexity"]
                eval_records[step] = {k: v for k, v in record.items() if k.startswith("eval/")}
    run.train = [train[step] for step in sorted(train)]
    # an evaluation record carries only its step: place it at the tokens seen by that update
    run.evals = [(tokens_at_step.get(step, 0), evals[step]) for step in sorted(evals)]
    run.eval_metrics = [(step, eval_records[step]) for step in sorted(eval_records)]
    return run


def _scale(config: dict[str, Any]) -> Any:
    """The run's scale: the value of the flag its optimizer's spec maps to the "scale" option, else its preset's."""
    try:
        spec = apollo.get_spec(config.get("optimizer") or "")
    except ValueError:
        return "-"
    flags = [flag for flag, option in spec.flags.items() if option == "scale"]
    if not flags:
        return "-"
    value = config.get(flags[0])
    return value if value is not None else apollo.PRESETS.get(spec.name, {}).get("scale", "-")


def _rank(config: dict[str, Any]) -> Any:
    optimizer = config.get("optimizer")
    if optimizer not in apollo.PRESETS:
        return "-"
    rank = config.get("rank") or apollo.PRESETS[optimizer]["rank"]
    return rank if rank is not None else "hidden/4"


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(runs: list[Run]) -> str:
    """One row per run, sorted by best perplexity (runs without evaluations last)."""
    header = ("| run | optimizer | rank | scale | lr | final ppl | best ppl | tokens | optimizer state MB | tokens/s |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    ordered = sorted(runs, key=lambda r: (r.best_perplexity is None, r.best_perplexity or 0.0))
    rows = [
        f"| {r.name} | {r.config.get('optimizer', 'n/a')} | {_rank(r.config)} | {_scale(r.config)} | "
        f"{_format(r.config.get('lr'), 'g')} | {_format(r.final_perplexity, '.2f')} | {_format(r.best_perplexity, '.2f')} | "
        f"{r.tokens:,} | {_format(None if r.state_bytes is None else r.state_bytes / 2**20, '.2f')} | "
        f"{_format(r.tokens_per_second, ',.0f')} |"
        for r in ordered
    ]
    return "\n".join([header, *rows]) + "\n"


def best_per(runs: list[Run], key: str) -> list[Run]:
    """The run with the lowest best perplexity for each value of config[key] (e.g. the best lr per optimizer)."""
    best: dict[Any, Run] = {}
    for run in runs:
        if run.best_perplexity is None:
            continue
        value = run.config.get(key)
        if value not in best or run.best_perplexity < best[value].best_perplexity:
            best[value] = run
    return list(best.values())


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as in TensorBoard): s_t = w s_{t-1} + (1 - w) x_t, divided by 1 - w^t."""
    smoothed, average = [], 0.0
    for t, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**t))
    return smoothed


def plot(runs: list[Run], out_png: Path, *, title: str, smoothing: float) -> None:
    """Two panels against tokens: validation perplexity (log scale) and smoothed training loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (ppl_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run.evals:
            tokens, perplexity = zip(*run.evals)
            ppl_axis.plot(tokens, perplexity, marker="o", markersize=3, label=run.name)
        if run.train:
            tokens, loss = zip(*run.train)
            loss_axis.plot(tokens, smooth(list(loss), smoothing), label=run.name)
    ppl_axis.set(xlabel="tokens", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    loss_axis.set(xlabel="tokens", ylabel=f"training loss (EMA {smoothing})", title="training loss")
    for axis in (ppl_axis, loss_axis):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def _tell_apart(runs: list[Run]) -> None:
    """Runs that share a name (sweeps of different optimizers all name theirs train-lr...) get their optimizer
    in front of it, so that legends and tables tell them apart."""
    counts = Counter(run.name for run in runs)
    for run in runs:
        if counts[run.name] > 1 and run.config.get("optimizer"):
            run.name = f"{run.config['optimizer']} {run.name}"


def compare(paths: list[str], out_dir: str | Path, *, title: str = "", smoothing: float = 0.9,
            best_per_key: str | None = None) -> list[Run]:
    """Load every run it can, report the others on stderr, write comparison.md and perplexity.png into out_dir.

    With `best_per_key` (e.g. "optimizer"), comparison.md opens with a table of the best run per value of
    that config key, and the PNG shows only those runs; the table of all runs follows.
    """
    runs = []
    for path in paths:
        try:
            run = load_run(path)
        except RunError as error:
            print(f"compare: skipped {error}", file=sys.stderr)
            continue
        if not run.evals:
            print(f"compare: {run.directory}: no evaluation points yet; plotted as training loss only", file=sys.stderr)
        runs.append(run)
    if not runs:
        raise RunError("none of the given directories holds a run to compare")
    _tell_apart(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, plotted = markdown_table(runs), runs
    if best_per_key:
        plotted = best_per(runs, best_per_key) or runs
        text = (f"Best run per {best_per_key} (lowest validation perplexity):\n\n{markdown_table(plotted)}\n"
                f"All runs:\n\n{text}")
    (out_dir / "comparison.md").write_text(text, encoding="utf-8")
    plot(plotted, out_dir / "perplexity.png", title=title, smoothing=smoothing)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or wandb offline folders inside them)")
    parser.add_argument("--out", default="comparison", help="folder for comparison.md and perplexity.png")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--smoothing", type=float, default=0.9, help="EMA weight of the training-loss curve, in [0, 1)")
    parser.add_argument("--best_per", default=None, metavar="KEY",
                        help="also table (and plot only) the best run per value of this config key, e.g. optimizer")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0 or math.isnan(args.smoothing):
        print(f"compare: --smoothing must be in [0, 1), got {args.smoothing}", file=sys.stderr)
        return 2
    try:
        runs = compare(args.runs, args.out, title=args.title, smoothing=args.smoothing, best_per_key=args.best_per)
    except RunError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 1
    print((Path(args.out) / "comparison.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {Path(args.out) / 'comparison.md'} and {Path(args.out) / 'perplexity.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
