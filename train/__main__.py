"""`python -m train ...` and `torchrun --nproc_per_node N -m train ...`: flags -> checks -> the loop.

Every bad flag, combination, file or checkpoint fails before the run folder, wandb or a process group
exists: `resolve` checks every value by its field's domain (train/config.py), `preflight` every file
(train/preflight.py); exit code 2 and one line on stderr that says what to change. Later failures
are one line too: a checkpoint damaged past the preflight's checks (a CRC-32 mismatch found while
loading) exits 2; a NaN/inf loss (with --nan_policy stop) exits 1 naming the update; a save that failed
(a full disk, a write error) exits 1 saying so, its temporary folder removed and the previous
checkpoint untouched. A finished run, and a run stopped by SIGTERM/SIGINT after saving, exit 0.

Restarts resume themselves (--resume auto, the default): the same command into a run folder whose
newest complete checkpoint was saved with the same settings resumes it (one line says from which
update), so `torchrun --max_restarts` and a requeued SLURM job recover a run by running the command
again; a finished run started again exits 0 saying it is complete; other settings are refused as for
--continue_from. `--resume never` refuses any folder with checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from train.checkpoint import DISK_FULL_ERRNOS, CheckpointError, CheckpointSaveError, newest_checkpoint
from train.config import ConfigError, parse_args, resolve
from train.distributed import broadcast_object, env_world, setup, teardown
from train.preflight import preflight
from train.resume_check import RunComplete, auto_resume, explicit_resume


def one_line(text: str) -> str:
    """`text` on one line: a line break inside a value or a library's message is shown as \\n."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    """Parse, check, train; returns the process exit code."""
    rank, _, world_size = env_world()
    say = (lambda line: print(one_line(line), file=sys.stderr, flush=True)) if rank == 0 else (lambda line: None)
    try:
        config, warnings = resolve(explicit_resume(parse_args(argv)), world_size)
        config, resumed = auto_resume(config)  # a restarted or requeued job: the same command into the same folder
        config, tokenizer, more_warnings = preflight(config, world_size)
    except (ConfigError, CheckpointError) as error:
        say(f"error: {error}")
        return 2
    except RunComplete as done:  # sweeps and requeued jobs run a finished command again
        say(str(done))
        return 0
    for warning in warnings + more_warnings:
        say(f"warning: {warning}")
    if resumed:
        say(resumed)
    if config.dry_run:  # before any process group: a launcher may set WORLD_SIZE for a single dry-run process
        from train.plan import describe

        if rank == 0:
            print("\n".join(describe(config, world_size)), flush=True)
        return 0

    from train.loop import NonFiniteLossError, train
    from train.relora import ReLoRAError

    ctx = setup()
    try:
        # Every rank trains into rank 0's folder (a default save_dir holds a timestamp).
        save_dir, name = broadcast_object((config.save_dir, config.name))
        return train(dataclasses.replace(config, save_dir=save_dir, name=name), ctx, tokenizer)
    except CheckpointError as error:  # found while loading: a CRC-32 mismatch, a file that does not load
        say(f"error: --continue_from: {error}")
        return 2
    except ReLoRAError as error:  # found at the first update: the optimizer's state has no Adam moments to prune
        say(f"error: {error}")
        return 2
    except (NonFiniteLossError, CheckpointSaveError) as error:
        say(f"error: {error}")
        return 1
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        newest = newest_checkpoint(config.save_dir)
        say(f"error: the disk is full ({os.strerror(error.errno)}: {error.filename or 'writing the run folder'}); "
            + (f"the newest complete checkpoint is {newest}: free space, then resume with --continue_from {config.save_dir}"
               if newest else "no checkpoint was saved yet"))
        return 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
