"""Resuming a run (--continue_from): which settings may differ from the checkpoint's, and the check that enforces it.

A resumed run must be the run that was saved, continued. Only the settings below may change; every
other field of TrainConfig changes the math or the data (the model, the optimizer and each of its
hyper-parameters, the lr schedule, the batch arithmetic, max_length, packing, the seeds, the data
and tokenizer, dtype and state dtype, the memory modes, the loader's workers), and a difference
in any of them stops the run before anything is built: exit 2, one line naming every differing field
with the checkpoint's value and the command line's. A field added to TrainConfig later is in that
second group until it is listed here. The world size is checked apart (one rank file per process).

| may change on resume    | why it is safe                                                                 |
|-------------------------|--------------------------------------------------------------------------------|
| continue_from, save_dir | where the run is read from and written to                                      |
| resume                  | how the checkpoint to resume is chosen (auto, never, a path)                   |
| async_save              | when checkpoint shards are written (the same files)                            |
| name, project, entity   | wandb bookkeeping                                                              |
| wandb                   | wandb mode (online/offline/disabled)                                           |
| log_every               | how often metrics are logged                                                   |
| eval_every, eval_tokens, eval_batch_size | evaluation only; the training updates are unchanged           |
| save_every, keep_last   | how often checkpoints are written and how many are kept                        |
| dry_run                 | prints the plan, trains nothing                                                |
| nan_policy              | what happens at a NaN/inf loss; a finite run is unchanged                      |
| activation_checkpointing, single_gpu | memory and wrapping only: the same numbers              |
| peak_tflops             | the MFU figure only                                                            |
| num_training_steps, max_train_tokens | the run may be extended (or cut) as long as it ends after the checkpoint's update |

Extending num_training_steps: the schedule is a pure function of (update, num_training_steps), so
the resumed run follows the schedule of a run planned for the new total from its first update:
cosine and linear decay are re-stretched over the new total, and the lr at the resume point jumps
to that schedule's value (up, when the run is extended); warmup is unchanged. The resume warning
states both values. A constant schedule, or a schedule whose decay starts at a fraction of the run
that has not been reached yet, continues seamlessly.

Paths (model_config, tokenizer, data_dir) compare equal when they are the same string or name the
same existing file or folder.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

from train.config import ConfigError, TrainConfig
from train.schedule import lr_multiplier

MAY_CHANGE: dict[str, str] = {
    "continue_from": "where the run is read from",
    "save_dir": "where the run is written to",
    "resume": "how the checkpoint to resume is chosen",
    "async_save": "when checkpoint shards are written; the same files",
    "name": "wandb run name",
    "project": "wandb project",
    "entity": "wandb entity",
    "wandb": "wandb mode",
    "log_every": "how often metrics are logged",
    "eval_every": "evaluation only",
    "eval_tokens": "evaluation only",
    "eval_batch_size": "evaluation only",
    "save_every": "how often checkpoints are written",
    "keep_last": "how many checkpoints are kept",
    "dry_run": "prints the plan, trains nothing",
    "nan_policy": "what a NaN/inf loss does; a finite run is unchanged",
    "activation_checkpointing": "recomputes the same activations: memory only",
    "peak_tflops": "the MFU figure only",
    "single_gpu": "no DDP wrapper; with one process (the world size must match) the same numbers",
    "num_training_steps": "the run may be extended; it must end after the checkpoint's update",
    "max_train_tokens": "sets num_training_steps",
}
PATH_FIELDS = ("model_config", "tokenizer", "data_dir")
WHERE = ("continue_from", "save_dir", "resume")


def _same(name: str, saved: Any, value: Any) -> bool:
    if saved == value:
        return True
    if name in PATH_FIELDS and isinstance(saved, str) and isinstance(value, str):
        try:
            return os.path.samefile(saved, value)
        except OSError:
            return False
    return False


def check_resume(saved: dict[str, Any], config: TrainConfig, *, step: int, checkpoint: str,
                 lead: tuple[str, str] | None = None, finished_ok: bool = False) -> list[str]:
    """Compare a checkpoint's saved config with the resolved command line; returns warnings, raises ConfigError.

    `saved` is the checkpoint's config.json; a field it lacks (saved by an older version) had its default.
    `step` is the checkpoint's update count. `lead`: the refusal's (opening, advice) around the
    differing fields (default: the --continue_from wording); `finished_ok`: a checkpoint at or past --num_training_steps is not refused here (--resume
    auto reports such a run as complete).
    """
    fields = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
    defaults = {name: spec.default for name, spec in fields.items() if spec.default is not dataclasses.MISSING}
    saved_full = {**defaults, **saved}
    current = config.to_dict()
    differing, allowed = [], []
    for name, value in current.items():
        before = saved_full.get(name)
        if _same(name, before, value):
            continue
        change = f"--{name} {before!r} -> {value!r}"
        if name in MAY_CHANGE:
            if name not in WHERE:  # where the run is read from and written to: not worth a warning
                allowed.append(change)
        else:
            differing.append(change)
    if differing:
        opening, advice = lead or (f"--continue_from {checkpoint} was saved with other settings that change the "
                                   "training", "resume with the checkpoint's values, or start a new run")
        raise ConfigError(f"{opening}: {', '.join(differing)} (checkpoint -> command line); {advice}")
    if config.num_training_steps <= step and not finished_ok:
        raise ConfigError(f"--num_training_steps {config.num_training_steps}: the checkpoint {checkpoint} is at update "
                          f"{step} already; give more updates to train on")
    warnings = []
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        warnings.append(f"{checkpoint} has settings this version does not know (ignored): {', '.join(unknown)}")
    if allowed:
        warnings.append(f"resuming {checkpoint} with changed settings: {', '.join(allowed)}")
    old_steps = saved_full.get("num_training_steps")
    if old_steps != config.num_training_steps and isinstance(old_steps, int) and step <= old_steps:
        # the schedule's other arguments are config fields of the same name (warmup_steps, scheduler, ...)
        schedule = {name: getattr(config, name) for name in inspect.signature(lr_multiplier).parameters
                    if name not in ("step", "num_training_steps") and hasattr(config, name)}
        before = lr_multiplier(step, num_training_steps=old_steps, **schedule)
        after = lr_multiplier(step, num_training_steps=config.num_training_steps, **schedule)
        warnings.append(f"the {config.scheduler} schedule is recomputed for {config.num_training_steps} updates: the lr "
                        f"multiplier at update {step} goes from {before:.6g} to {after:.6g}")
    return warnings


# ----------------------------------------------------------------------------- --resume


class RunComplete(Exception):
    """--resume auto found this run finished (its newest checkpoint at --num_training_steps): exit 0, one line."""


def explicit_resume(config: TrainConfig) -> TrainConfig:
    """--resume PATH is --continue_from PATH (before `resolve`, which derives --save_dir from it)."""
    if config.resume in ("auto", "never"):
        return config
    if config.continue_from is not None and config.continue_from != config.resume:
        raise ConfigError(f"--resume {config.resume} and --continue_from {config.continue_from} name two checkpoints; "
                          "give one of them")
    return dataclasses.replace(config, continue_from=config.resume)


def auto_resume(config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """--resume auto on a resolved config: (config to run, the line saying what was resumed, or None).

    When --save_dir holds a complete checkpoint and no --continue_from was given, the newest complete
    one is resumed if it was saved with this command's settings (those of MAY_CHANGE may differ, as
    with --continue_from); other settings: ConfigError naming every differing field; a checkpoint at or
    past --num_training_steps: RunComplete. A folder without complete checkpoints starts a new run.
    Every rank reads the same files, so every rank decides alike.
    """
    from train.checkpoint import CheckpointError, checkpoint_folders, select_checkpoint

    if config.resume != "auto" or config.continue_from is not None or not checkpoint_folders(config.save_dir):
        return config, None
    try:
        checkpoint, _ = select_checkpoint(config.save_dir)
    except CheckpointError:  # only damaged ones: a new run replaces them
        return config, None
    try:
        import torch

        step = int(torch.load(checkpoint / "trainer.pt", weights_only=True)["counters"]["step"])
        saved = json.loads((checkpoint / "config.json").read_text())
    except Exception as error:  # unpickling raises many types; each means the checkpoint cannot be used
        raise ConfigError(f"--resume auto: {checkpoint}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume auto: {checkpoint / 'config.json'} is not a json object")
    lead = (f"--save_dir {config.save_dir} holds checkpoints of a run with other settings that change the training",
            "run its command to resume it, or choose another --save_dir")
    check_resume(saved, config, step=step, checkpoint=str(checkpoint), lead=lead, finished_ok=True)
    if step >= config.num_training_steps:
        raise RunComplete(f"{config.save_dir}: the run is already complete ({checkpoint.name}, update {step} of "
                          f"{config.num_training_steps}); nothing to do")
    return (dataclasses.replace(config, continue_from=str(checkpoint)),
            f"--resume auto: resuming {checkpoint} at update {step} of {config.num_training_steps} (same settings)")
