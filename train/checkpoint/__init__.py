"""Checkpoints: everything needed to resume a run exactly, written atomically, checked before use, pruned.

A checkpoint is a folder `<save_dir>/step_<7 digits>/` holding
    model.safetensors   the weights (safetensors)
    optimizer.pt        optimizer.state_dict()
    trainer.pt          step, tokens_seen, last_eval_step, world_size, the schedule's state; with --relora
                        ReLoRA's merge and pruning counts and its generator's state (train/relora.py)
    rank_<5 digits>.pt  per rank: the data stream's position and the RNG states (torch, cuda, python, numpy)
    config.json         the resolved run config
    manifest.json       every other file's size and CRC-32 (written last: a folder without it is not trusted)
or, for a sharded run (--fsdp), instead of model.safetensors and optimizer.pt
    sharded/            torch.distributed.checkpoint of {"model", "optimizer"}: every rank writes its own
                        shards (no gather to one rank); loadable with the same world size
Every .pt file holds tensors, numbers, strings, lists and dicts only: `torch.load(weights_only=True)`
reads it. Model, optimizer and trainer state (identical on every rank) come from rank 0; the save
folder must be shared by all ranks.

The package, one job per module:
    format.py  names, manifest.json, the cheap completeness check (`damage`), which folder to resume
               (`select_checkpoint`), CRC-32 sums, the failure every rank agrees on
    save.py    `save_checkpoint`: `.tmp-step_N/` renamed to `step_N/` once complete (the rename is the
               commit), so a SIGKILL at any moment leaves the previous checkpoints as they were or the
               new one complete; a failure on any rank removes it on every rank (`CheckpointSaveError`);
               sharded saves may run in the background (`PendingCheckpoint`, committed by its wait())
    load.py    `check_fits` (saved shapes against a meta-device model), `verify_sums`, `load_checkpoint`
               (CRC-32 first, split over the ranks), `capture_rng` / `restore_rng`
    prune.py   `prune_checkpoints(save_dir, keep_last)`: older complete checkpoints deleted after a save
Collectives come from train/distributed.py (one process: they do nothing).
"""
from train.checkpoint.format import (DISK_FULL_ERRNOS, DOOMED, MANIFEST, OLD, PREFIX, REQUIRED_FILES, SHARDED_FILES,
                                     TEMPORARY, CheckpointError, CheckpointSaveError, checkpoint_folders,
                                     checkpoint_path, checkpoint_world_size, damage, find_checkpoint, is_sharded,
                                     newest_checkpoint, rank_file, safetensors_header, select_checkpoint, step_of)
from train.checkpoint.load import capture_rng, check_fits, load_checkpoint, restore_rng, verify_sums
from train.checkpoint.prune import prune_checkpoints
from train.checkpoint.save import PendingCheckpoint, save_checkpoint

__all__ = ["DISK_FULL_ERRNOS", "DOOMED", "MANIFEST", "OLD", "PREFIX", "REQUIRED_FILES", "SHARDED_FILES", "TEMPORARY",
           "CheckpointError", "CheckpointSaveError", "PendingCheckpoint", "capture_rng", "check_fits", "checkpoint_folders", "checkpoint_path",
           "checkpoint_world_size", "damage", "find_checkpoint", "is_sharded", "load_checkpoint", "newest_checkpoint",
           "prune_checkpoints", "rank_file", "restore_rng", "safetensors_header", "save_checkpoint", "select_checkpoint",
           "step_of", "verify_sums"]
