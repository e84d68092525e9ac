"""Pruning: keep the newest `keep_last` complete checkpoints of a run folder (rank 0, after a save completed)."""
from __future__ import annotations

import shutil
from pathlib import Path

from train.checkpoint.format import DOOMED, checkpoint_folders, damage, step_of


def prune_checkpoints(save_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete the checkpoints older than the newest `keep_last` complete ones (rank 0, after a save completed).

    Damaged folders older than the kept ones go too; damaged newer ones are left for a re-save to replace.
    A folder is renamed to `.del-...` before it is deleted, so a kill mid-delete leaves nothing that looks
    like a checkpoint. Returns the deleted folders.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    folders = checkpoint_folders(save_dir)
    complete = [path for path in folders if damage(path) is None]
    if len(complete) <= keep_last:
        return []
    oldest_kept = step_of(complete[-keep_last])
    deleted = []
    for path in folders:
        if step_of(path) < oldest_kept:
            doomed = path.with_name(DOOMED + path.name)
            path.rename(doomed)
            shutil.rmtree(doomed)
            deleted.append(path)
    return deleted
