"""Downstream evaluation with lm-eval's Hugging Face model (``HFLM``) on a run or an exported model.

    python -m train.evaluate_lm runs/llama_60m_apollo --data_dir /path/to/c4     # offline: C4 bits per byte
    python -m train.evaluate_lm exported/llama_60m --tasks hellaswag,arc_easy     # lm-eval's standard tasks

RUN_OR_EXPORT: a run folder (its latest complete checkpoint), one step_* folder (both exported on the
fly by `train.export` into a temporary folder, removed afterwards) or an exported folder
(``config.json`` + weights, as `train.export` writes it).

--data_dir DIR (no network needed): the task ``c4_local`` (train/tasks/c4_local.yaml, lm-eval's ``c4``
task) on DIR's ``c4-validation.*.json.gz``, the shards `train.data` validates on; the bits per byte
is printed. lm-eval's definition differs from the harness's ``eval/bits_per_byte`` (`train.evaluate`),
on the same text and bytes (the whole UTF-8 text of each document):

- lm-eval (0.4.x, ``add_bos_token`` unset) tokenises a document as the tokenizer does by default (t5:
  ``</s>`` appended, as in the harness) and scores every token after a one-token prefix, the
  tokenizer's BOS (t5 has none: ``</s>``); the harness scores the tokens after the first (the first
  is context, no prefix);
- a document longer than the model's window: lm-eval scores all of it in disjoint windows (each
  window's first token sees only the previous token); the harness truncates it to --max_length and
  counts the bytes up to the last kept token;
- lm-eval's c4 task detokenises wikitext-style spacing (" , " -> ", ") before scoring, counting the
  bytes of the original text.

So for a short document x_1..x_n </s> the numerators differ by -log2 p(x_1 | </s>) plus the change
of every other term's context by the leading ``</s>`` (positions shift by one); the denominators are
equal. tests/train/test_evaluate_lm.py checks both values against a float64 re-derivation of each
definition and their difference against the implied one.

--tasks: comma-separated lm-eval task names (default ``c4_local`` with --data_dir). Standard tasks
(hellaswag, arc_easy, ...) need their datasets in the Hugging Face cache: run once with network
(``HF_DATASETS_OFFLINE=0``) to download them, then offline. Exit status 0; 2 with one line for a bad
input (no such folder, no checkpoint, no validation shards, an unknown task, a task whose data cannot be
loaded, e.g. not in the cache while offline) before any model is loaded.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASK = "c4_local"


class EvaluateError(ValueError):
    """A bad input; the message is one line."""


def local_task(data_dir: str | Path) -> dict[str, Any]:
    """c4_local.yaml read by lm-eval's YAML loader, its validation data pointed at `data_dir`'s shards."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from train.data import SHARD_PATTERNS

    files = sorted(glob.glob(str(Path(data_dir) / SHARD_PATTERNS["validation"])))
    if not files:
        raise EvaluateError(f"--data_dir {data_dir}: no {SHARD_PATTERNS['validation']} files there")
    config = load_yaml(TASKS_DIR / f"{LOCAL_TASK}.yaml")
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": {"validation": files}}
    return config


def task_specs(tasks: list[str], data_dir: str | None) -> tuple[list[Any], Any]:
    """(lm-eval task specs, TaskManager). Unknown names are an EvaluateError (checked before any model loads)."""
    from lm_eval.tasks import TaskManager

    if LOCAL_TASK in tasks and data_dir is None:
        raise EvaluateError(f"task {LOCAL_TASK} reads --data_dir: give the C4 folder")
    others = [name for name in tasks if name != LOCAL_TASK]
    # indexing lm-eval's ~15k task files takes tens of seconds: only when a standard task is asked for
    manager = TaskManager() if others else TaskManager(include_defaults=False, include_path=str(TASKS_DIR))
    unknown = [name for name in others if name not in manager.all_tasks]
    if unknown:
        raise EvaluateError(f"unknown lm-eval task(s) {', '.join(unknown)} (lm-eval --tasks list shows them)")
    return [local_task(data_dir) if name == LOCAL_TASK else name for name in tasks], manager


def model_folder(path: Path, scratch: Path) -> Path:
    """An exported folder as it is; a run or step_* folder exported into `scratch` by `train.export`."""
    from train import export

    if not path.exists():
        raise EvaluateError(f"{path} does not exist: give a run folder, a step_* checkpoint or an exported folder")
    if (path / "config.json").is_file() and any(path.glob("model*.safetensors")):
        return path
    try:
        return export.export(path, scratch / "hf")
    except export.ExportError as error:
        raise EvaluateError(str(error)) from None


def evaluate(path: str | Path, tasks: list[str], *, data_dir: str | None = None, batch_size: int = 8,
             device: str = "cpu", max_length: int | None = None, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's results dict (``results[task][metric + ",none"]``) for the model at `path`. Raises EvaluateError."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs, manager = task_specs(tasks, data_dir)
    try:  # the datasets, before any model is loaded: a standard task not in the cache fails here, offline
        manager.load(specs)
    except Exception as error:  # datasets' offline/connection/file errors differ by version: one line for all
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EvaluateError(f"cannot load the data of {','.join(tasks)} ({type(error).__name__}: {first}); "
                            f"a standard task downloads once with network (HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0)") from None
    with tempfile.TemporaryDirectory(prefix="evaluate_lm-") as scratch:
        folder = model_folder(Path(path), Path(scratch))
        model = HFLM(pretrained=str(folder), device=device, batch_size=batch_size, max_length=max_length)
        return lm_eval.simple_evaluate(model=model, tasks=specs, task_manager=manager, limit=limit,
                                       log_samples=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_lm", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="RUN_OR_EXPORT", help="run folder, step_* checkpoint or exported folder")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated lm-eval tasks (default {LOCAL_TASK} with --data_dir)")
    parser.add_argument("--data_dir", default=None, help="C4 folder for the offline task (c4-validation.*.json.gz)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--max_length", type=int, default=None,
                        help="window length lm-eval scores in (default: the model config's max_position_embeddings)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--output", default=None, help="write lm-eval's results as JSON here")
    args = parser.parse_args(argv)
    tasks = [name for name in (args.tasks or (LOCAL_TASK if args.data_dir else "")).split(",") if name]
    try:
        if not tasks:
            raise EvaluateError("give --tasks, or --data_dir for the offline C4 task")
        for flag in ("batch_size", "max_length", "limit"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise EvaluateError(f"--{flag} {value}: must be at least 1")
        results = evaluate(args.path, tasks, data_dir=args.data_dir, batch_size=args.batch_size,
                           device=args.device, max_length=args.max_length, limit=args.limit)
    except EvaluateError as error:
        print(f"evaluate_lm: {error}", file=sys.stderr)
        return 2
    for task, metrics in results["results"].items():
        shown = {key.split(",")[0]: value for key, value in metrics.items()
                 if isinstance(value, float) and "stderr" not in key}
        print(f"{task}: " + ", ".join(f"{key} {value:.6f}" for key, value in shown.items()))
    if args.output:
        Path(args.output).write_text(json.dumps(results["results"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
