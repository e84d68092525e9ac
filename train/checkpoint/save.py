"""Writing a checkpoint atomically on every rank (`save_checkpoint`); a failure anywhere undoes it on every rank.

The steps (every rank calls `save_checkpoint`):
 1. rank 0 tidies what a killed save left (a `.old-step_N` whose `step_N` is missing is put back;
    `.tmp-*` and `.del-*` folders are removed) and creates `.tmp-step_N/`;
 2. the sharded state (torch.distributed.checkpoint fails on every rank when one rank fails), then
    each rank's own files; every rank then learns whether any rank failed;
 3. the files are read back for their CRC-32 and fsynced (the files split over the ranks), rank 0
    writes manifest.json, gives every file `0666 & ~umask` and every folder `0777 & ~umask` (the
    safetensors writer alone would leave 0600), fsyncs the folder and renames it to `step_N/`: the
    rename is the commit. A re-save of a step moves the old folder to `.old-step_N` first and removes
    it after the swap.
A failure in any step (a full disk, a quota, a write error on any rank) removes the temporary folder
and raises `CheckpointSaveError` on every rank: one line naming the file, saying "the disk is full"
for ENOSPC/EDQUOT, and naming the newest complete checkpoint, which is untouched.

Asynchronous sharded saves (`asynchronous=True`, --async_save): step 2 starts `dcp.async_save` (the
shards copied to CPU memory, then written by a background thread on a gloo group of its own) and the
save returns a `PendingCheckpoint`; step 3 runs when the trainer calls its `wait()` (before the next
save, at the end, on the way out). Until then the checkpoint is a `.tmp-` folder: a kill during the
background write leaves the previous complete checkpoint the newest, as for a synchronous save.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_model
from torch import nn

from train.checkpoint.format import (DISK_FULL_ERRNOS, MANIFEST, OLD, TEMPORARY, DOOMED, CheckpointSaveError, Failure,
                                     agree, checkpoint_path, error_number, file_sum, first_line, is_failure,
                                     newest_checkpoint, rank_file, sharded_state, step_of)
from train.distributed import all_gather_object, barrier, broadcast_object, world_size


def _attempt(action: Callable[[], Any], what: Path) -> Failure | None:
    """Run `action` (writing `what`); a failure of any kind becomes one line, "the disk is full" where it is."""
    try:
        action()
        return None
    except _FileWriteError as error:
        what, cause = error.path, error.cause
    except BaseException as error:  # any writer's exception: the save failed and must be undone
        if not is_failure(error):
            raise
        cause = error
    number = error_number(cause)
    if number in DISK_FULL_ERRNOS:
        return Failure(f"the disk is full ({os.strerror(number)} writing {what})", disk_full=True)
    reason = os.strerror(number) if number else first_line(cause)
    return Failure(f"writing {what} failed ({reason})")


class _FileWriteError(Exception):
    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.path, self.cause = path, cause


class _Sink:
    """A file for torch.save that keeps the OSError of a failed write (torch's writer turns it into a bare RuntimeError)."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _write(path: Path, writer: Callable[[Any], None]) -> None:
    """Create `path` and fill it with `writer(file)`; any failure is a _FileWriteError naming the file."""
    try:
        with open(path, "wb") as file:
            sink = _Sink(file)
            try:
                writer(sink)
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
    except Exception as error:
        raise _FileWriteError(path, error) from error


def _torch_save(value: Any, path: Path) -> None:
    _write(path, lambda file: torch.save(value, file))


def _save_weights(model: nn.Module, path: Path) -> None:
    try:
        save_model(model, str(path))
    except Exception as error:  # SafetensorError carries "os error N" in its text
        raise _FileWriteError(path, error) from error


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



def _sync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _tidy(save_dir: Path) -> None:
    """Undo what a killed save or prune left: put back an orphaned `.old-step_N`, remove `.tmp-*`/`.del-*` folders."""
    for path in save_dir.iterdir() if save_dir.is_dir() else ():
        if path.name.startswith(OLD) and step_of(path) is not None:
            original = path.with_name(path.name[len(OLD):])
            if original.exists():
                shutil.rmtree(path)
            else:
                path.rename(original)
        elif path.name.startswith((TEMPORARY, DOOMED)) and path.is_dir():
            shutil.rmtree(path)



# ----------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class _Target:
    """The folders of one save: `.tmp-step_N` written, `step_N` committed, `.old-step_N` during a re-save."""

    save_dir: Path
    step: int
    rank: int

    @property
    def final(self) -> Path:
        return checkpoint_path(self.save_dir, self.step)

    @property
    def temporary(self) -> Path:
        return self.save_dir / f"{TEMPORARY}{self.final.name}"

    @property
    def stale(self) -> Path:
        return self.save_dir / f"{OLD}{self.final.name}"


class PendingCheckpoint:
    """An asynchronous sharded save in flight: its shards are being written by torch.distributed.checkpoint's
    background thread. `wait()` (every rank, in the same order as its other collectives) waits for them, then
    sums, writes the manifest and renames the folder exactly as a synchronous save does; until then the
    checkpoint is a `.tmp-` folder, so a kill loses nothing that was complete."""

    def __init__(self, target: _Target, future: Any) -> None:
        self.target, self._future, self._done = target, future, None

    def wait(self) -> Path:
        """The committed checkpoint folder; CheckpointSaveError on every rank when any rank's write failed."""
        if self._done is None:
            future = getattr(self._future, "upload_completion", self._future)  # an AsyncSaveResponse or a Future
            self._done = _complete(self.target, agree(_attempt(future.result, self.target.temporary / "sharded")))
        return self._done


_ASYNC_GROUP: list = []  # the gloo group of the background writes (created once, by every rank)


def _async_group():
    """A process group for the background thread's collectives, apart from the training's (no interleaving)."""
    import torch.distributed as dist

    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo") if world_size() > 1 else None)
    return _ASYNC_GROUP[0]


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config: dict[str, Any],
    rank: int = 0,
    sharded: bool = False,
    asynchronous: bool = False,
) -> Path | PendingCheckpoint:
    """Write the checkpoint after `step` updates atomically; every rank must call this. Returns its folder.

    `sharded`: the model was sharded with FSDP2; every rank writes its shards with torch.distributed.checkpoint.
    `asynchronous` (with `sharded`): `dcp.async_save` copies the shards to CPU memory and writes them in a
    background thread; returns a PendingCheckpoint at once, whose `wait()` commits it (same manifest, same
    rename). Raises CheckpointSaveError on every rank when any rank failed; nothing of the failed save is left.
    """
    target = _Target(Path(save_dir), step, rank)
    temporary = target.temporary

    def prepare() -> None:
        target.save_dir.mkdir(parents=True, exist_ok=True)
        _tidy(target.save_dir)
        temporary.mkdir()

    failure = agree(_attempt(prepare, temporary) if rank == 0 else None)
    future = None
    if failure is None and sharded:  # collective: it fails on every rank when one rank fails
        import torch.distributed.checkpoint as dcp

        def write_shards() -> None:
            nonlocal future
            state = sharded_state(model, optimizer)
            if asynchronous:
                future = dcp.async_save(state, checkpoint_id=temporary / "sharded", process_group=_async_group())
            else:
                dcp.save(state, checkpoint_id=temporary / "sharded")

        failure = _attempt(write_shards, temporary / "sharded")
    if failure is None:
        def write_own_files() -> None:
            _torch_save(rank_state, rank_file(temporary, rank))
            if rank == 0:
                if not sharded:
                    _save_weights(model, temporary / "model.safetensors")
                    _torch_save(optimizer.state_dict(), temporary / "optimizer.pt")
                _torch_save(trainer_state, temporary / "trainer.pt")
                _write(temporary / "config.json", lambda file: file.write((json.dumps(config, indent=2) + "\n").encode()))

        failure = _attempt(write_own_files, temporary)
    failure = agree(failure)
    if future is not None:
        pending = PendingCheckpoint(target, future)
        if failure is None:
            return pending
        _attempt(getattr(future, "upload_completion", future).result, temporary)  # let the writer stop first
    return _complete(target, failure)


def _complete(target: _Target, failure: Failure | None) -> Path:
    """Sum, fsync, write the manifest and rename (every rank); or, after `failure`, remove the temporary folder."""
    temporary, final, stale, rank, world = target.temporary, target.final, target.stale, target.rank, world_size()
    if failure is None:  # read every file back: CRC-32 and fsync, the files split over the ranks
        names = broadcast_object(sorted(str(p.relative_to(temporary)) for p in temporary.rglob("*") if p.is_file())
                                 if rank == 0 else None)
        sums: dict[str, dict[str, int]] = {}
        failure = agree(_attempt(lambda: sums.update({name: file_sum(temporary / name, sync=True)
                                                      for name in names[rank::world]}), temporary))
    if failure is None:
        sums = {name: entry for part in all_gather_object(sums) for name, entry in part.items()}

        def commit() -> None:
            manifest = {"format": 1, "step": target.step, "world_size": world, "files": dict(sorted(sums.items()))}
            _write(temporary / MANIFEST, lambda file: file.write((json.dumps(manifest, indent=1) + "\n").encode()))
            mask = _umask()
            for path in [temporary, *temporary.rglob("*")]:
                path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
                if path.is_dir():
                    _sync_folder(path)
            if final.exists():  # a re-save of the same step: swap the new one in, then drop the old
                final.rename(stale)
            temporary.rename(final)  # the commit: from here on the new checkpoint is complete

        failure = broadcast_object(_attempt(commit, temporary / MANIFEST) if rank == 0 else None)
        if failure is None and rank == 0:  # after the commit: best effort, the checkpoint stands either way
            shutil.rmtree(stale, ignore_errors=True)
            try:
                _sync_folder(target.save_dir)
            except OSError:
                pass
    if failure is not None:
        barrier()  # every rank has stopped writing
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            if stale.exists() and not final.exists():
                stale.rename(final)
        barrier()
        newest = newest_checkpoint(target.save_dir)
        raise CheckpointSaveError(
            f"checkpoint {final} was not saved: {failure.text}; its temporary folder was removed and the newest "
            f"complete checkpoint is {newest or 'none (this was the first save)'}"
            + (f": free space, then resume with --continue_from {target.save_dir}" if newest else ""),
            disk_full=failure.disk_full)
    barrier()
    return final
