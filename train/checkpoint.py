"""Checkpoints: everything needed to resume a run exactly, written atomically, checked before use, pruned.

A checkpoint is a folder `<save_dir>/step_<7 digits>/` holding
    model.safetensors   the weights (safetensors)
    optimizer.pt        optimizer.state_dict()
    trainer.pt          step, tokens_seen, last_eval_step, world_size, the schedule's state
    rank_<5 digits>.pt  per rank: the data stream's position and the RNG states (torch, cuda, python, numpy)
    config.json         the resolved run config
    manifest.json       every other file's size and CRC-32 (written last: a folder without it is not trusted)
or, for a sharded run (--fsdp), instead of model.safetensors and optimizer.pt
    sharded/            torch.distributed.checkpoint of {"model", "optimizer"}: every rank writes its own
                        shards (no gather to one rank); loadable with the same world size
Every .pt file holds tensors, numbers, strings, lists and dicts only: `torch.load(weights_only=True)`
reads it. Model, optimizer and trainer state (identical on every rank) come from rank 0; the save
folder must be shared by all ranks.

Saving (`save_checkpoint`, called by every rank) writes `.tmp-step_N/` and renames it to `step_N/`
once complete; the rename is the commit, so a SIGKILL at any moment leaves either the previous
checkpoints as they were or the new one complete. The steps:
 1. rank 0 tidies what a killed save left (a `.old-step_N` whose `step_N` is missing is put back;
    `.tmp-*` and `.del-*` folders are removed) and creates the temporary folder;
 2. the sharded state (torch.distributed.checkpoint fails on every rank when one rank fails), then
    each rank's own files; every rank then learns whether any rank failed;
 3. the files are read back for their CRC-32 and fsynced (the files split over the ranks), rank 0
    writes manifest.json, gives every file `0666 & ~umask` and every folder `0777 & ~umask` (the
    safetensors writer alone would leave 0600), fsyncs the folder and renames it. A re-save of a
    step moves the old folder to `.old-step_N` first and removes it after the swap.
A failure in any step (a full disk, a quota, a write error on any rank) removes the temporary folder
and raises `CheckpointSaveError` on every rank: one line naming the file, saying "the disk is full"
for ENOSPC/EDQUOT, and naming the newest complete checkpoint, which is untouched.

Reading: `damage(checkpoint)` is the cheap check (every manifest file present with its size, the
safetensors header consistent with the file, every .pt a readable zip archive, config.json json);
`select_checkpoint(run_dir)` returns the newest checkpoint that passes it and names the damaged newer
ones it skipped; `check_fits` compares the saved shapes with a (meta-device) model and optimizer;
`load_checkpoint` first checks every file's CRC-32 against the manifest (split over the ranks, the
verdict shared) and raises `CheckpointError` (one line naming the file) for a damaged or unloadable
file. Checkpoints written before manifests existed are checked by their structure only.

Pruning: `prune_checkpoints(save_dir, keep_last)` deletes the checkpoints older than the newest
`keep_last` complete ones; it runs after a save completed, so the newest is never deleted.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn

PREFIX = "step_"
TEMPORARY, OLD, DOOMED = ".tmp-", ".old-", ".del-"  # a save in progress, the old half of a re-save, a prune in progress
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "config.json")
SHARDED_FILES = ("sharded/.metadata", "trainer.pt", "config.json")  # --fsdp: torch.distributed.checkpoint
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                      "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_CHUNK = 16 << 20  # bytes per read when summing a file


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, damaged, or not fitting the model); one line naming the file."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; its temporary folder was removed and the previous checkpoints are untouched."""

    def __init__(self, message: str, *, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def checkpoint_path(save_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` updates lives."""
    return Path(save_dir) / f"{PREFIX}{step:07d}"


def rank_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank_{rank:05d}.pt"


def step_of(path: str | Path) -> int | None:
    """N of a `step_N` (or `.old-step_N`) folder name; None for any other name."""
    match = re.fullmatch(rf"(?:{re.escape(OLD)})?{PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_sharded(checkpoint: Path) -> bool:
    """Whether `checkpoint` was written by a sharded (--fsdp) run."""
    return (Path(checkpoint) / "sharded").is_dir()


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint` (one rank file each)."""
    return len(list(Path(checkpoint).glob("rank_*.pt")))


# ----------------------------------------------------------------------------- finding and checking


def checkpoint_folders(save_dir: str | Path) -> list[Path]:
    """The `step_N` folders of a run folder in step order, with a `.old-step_N` a killed re-save left without `step_N`."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(save_dir.iterdir(), key=lambda p: p.name.startswith(OLD)):  # step_N before .old-step_N
        step = step_of(path)
        if step is not None and path.is_dir():
            found.setdefault(step, path)
    return [found[step] for step in sorted(found)]


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file; ValueError when the header or its offsets do not fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size} (truncated or not safetensors)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"unreadable safetensors header ({error})") from None
    data_bytes, end, tensors = size - 8 - length, 0, {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if stop - start != math.prod(shape) * _SAFETENSORS_BYTES[dtype] or stop > data_bytes or start < 0:
                raise ValueError(f"tensor {name} ({dtype} {list(shape)}) does not fit bytes {start}..{stop} of {data_bytes}")
            end, tensors[name] = max(end, stop), (dtype, shape)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"malformed safetensors header ({type(error).__name__}: {error})") from None
    if end != data_bytes:
        raise ValueError(f"{data_bytes} data bytes where the header describes {end} (truncated or overwritten)")
    return tensors


def _file_problem(path: Path) -> str | None:
    """What is wrong with one checkpoint file by its structure (cheap: headers only), or None."""
    try:
        if path.stat().st_size == 0:
            return "empty"
        if path.suffix == ".safetensors":
            safetensors_header(path)
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:  # reads the central directory at the end of the file
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    return "not a torch.save file"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except (zipfile.BadZipFile, ValueError) as error:
        return f"truncated or corrupt ({_first_line(error)})"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None


def _manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The manifest's {"files": {name: {"size", "crc32"}}, ...}, None without one; ValueError if it is unreadable."""
    path = checkpoint / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not all(isinstance(entry["size"], int) and isinstance(entry["crc32"], int) for entry in files.values()):
            raise TypeError("sizes and crc32 sums must be integers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: unreadable manifest ({_first_line(error)})") from None
    return manifest


def damage(checkpoint: str | Path) -> str | None:
    """What is wrong with `checkpoint`, as one line naming the file, or None when it is complete.

    Cheap checks only (sizes and headers); the CRC-32 sums are checked when it is loaded.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a folder"
    try:
        manifest = _manifest(checkpoint)
    except ValueError as error:
        return str(error)
    if manifest is None:  # written before manifests existed: whatever files are there
        names = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    else:
        names = set(manifest["files"])
        for name in sorted(names):
            path, expected = checkpoint / name, manifest["files"][name]["size"]
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != expected:
                return f"{path}: {path.stat().st_size} bytes where the manifest says {expected} (truncated or overwritten)"
    required = SHARDED_FILES if is_sharded(checkpoint) else REQUIRED_FILES
    missing = [name for name in required if name not in names]
    ranks = sorted(name for name in names if re.fullmatch(r"rank_\d{5}\.pt", name))
    if not ranks:
        missing.append("rank_*.pt")
    if missing:
        return f"{checkpoint} is incomplete: missing {', '.join(missing)}"
    if ranks != [rank_file(Path(), rank).name for rank in range(len(ranks))]:
        return f"{checkpoint} is incomplete: rank files {', '.join(ranks)} are not rank_00000.pt .. rank_{len(ranks) - 1:05d}.pt"
    for name in sorted(names):
        problem = _file_problem(checkpoint / name)
        if problem:
            return f"{checkpoint / name}: {problem}"
    return None


def select_checkpoint(path: str | Path) -> tuple[Path, list[str]]:
    """(checkpoint to resume, one line per newer damaged checkpoint skipped on the way to it).

    `path` is a checkpoint folder (used only when complete) or a run folder (its newest complete
    checkpoint). CheckpointError when there is none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if step_of(path) is not None or (path / "trainer.pt").exists() or (path / MANIFEST).exists():
        problem = damage(path)
        if problem:
            raise CheckpointError(f"checkpoint {problem}")
        return path, []
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a checkpoint nor a run folder")
    skipped = []
    for candidate in reversed(checkpoint_folders(path)):
        problem = damage(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append(problem)
    if not skipped:
        raise CheckpointError(f"{path} holds no checkpoint (a {PREFIX}* folder)")
    raise CheckpointError(f"{path} holds no complete checkpoint: {'; '.join(skipped)}")


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint folder itself, or the newest complete checkpoint of a run folder; CheckpointError if none."""
    return select_checkpoint(path)[0]


def newest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    try:
        return select_checkpoint(save_dir)[0] if Path(save_dir).is_dir() else None
    except CheckpointError:
        return None


def _alias_free_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the state dict the safetensors writer keeps: one name per tensor (tied weights are saved once)."""
    shapes, seen = {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen[id(value)] = name
        shapes[name] = tuple(value.shape)
    return shapes


def _optimizer_layout(state: dict[str, Any]) -> Any:
    """What must match between a saved optimizer state and an optimizer: parameters per group (or layer-wise names)."""
    if "param_groups" in state:
        return [len(group["params"]) for group in state["param_groups"]]
    if "names" in state:  # apollo.layerwise.LayerwiseOptimizer
        return list(state["names"])
    return None


def check_fits(checkpoint: str | Path, model: nn.Module, optimizer: Any) -> None:
    """CheckpointError naming the file when the saved tensors or optimizer groups do not fit `model`/`optimizer`.

    Reads headers and metadata only; `model` and `optimizer` may live on the meta device.
    """
    checkpoint = Path(checkpoint)
    expected = _alias_free_shapes(model)
    if is_sharded(checkpoint):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        file = checkpoint / "sharded" / ".metadata"
        try:
            entries = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
        except Exception as error:  # a pickle of torch's classes: any failure means it cannot be used
            raise CheckpointError(f"{file}: unreadable ({_first_line(error)})") from None
        saved = {key[len("model."):]: tuple(entry.size) for key, entry in entries.items()
                 if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    else:
        file = checkpoint / "model.safetensors"
        try:
            saved = {name: shape for name, (_, shape) in safetensors_header(file).items()}
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file}: {_first_line(error)}") from None
    missing = [name for name in expected if name not in saved]
    extra = [name for name in saved if name not in expected]
    if missing or extra:
        raise CheckpointError(f"{file} does not hold this model's tensors: missing {missing[:3]}, unexpected {extra[:3]} "
                              f"({len(missing)} and {len(extra)}); was --model_config or --weight_quant changed?")
    for name, shape in expected.items():
        if saved[name] != shape:
            raise CheckpointError(f"{file}: {name} has shape {list(saved[name])}, this model's is {list(shape)}; "
                                  "was the model config changed?")
    if is_sharded(checkpoint):
        return
    file = checkpoint / "optimizer.pt"
    try:
        saved_layout = _optimizer_layout(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    except Exception as error:  # unpickling errors come in many types; none of them leaves a usable file
        raise CheckpointError(f"{file}: unreadable ({_first_line(error)})") from None
    layout = _optimizer_layout(optimizer.state_dict())
    if saved_layout != layout:
        raise CheckpointError(f"{file}: parameter groups {saved_layout} do not match this optimizer's {layout}; "
                              "was --optimizer or the model changed?")


# ----------------------------------------------------------------------------- ranks agreeing


@dataclass(frozen=True)
class _Failure:
    text: str
    disk_full: bool = False


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree(failure: _Failure | None) -> _Failure | None:
    """The first failure of any rank, on every rank (a collective: every rank must call it)."""
    if _world() == 1:
        return failure
    gathered: list[Any] = [None] * _world()
    dist.all_gather_object(gathered, failure)
    return next((item for item in gathered if item is not None), None)


def _share(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _errno(error: BaseException) -> int | None:
    """The OS error number behind `error`: its errno, its causes', or "os error N" in its text (the safetensors writer)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        for inner in getattr(error, "failures", {}).values():  # torch.distributed.checkpoint's CheckpointException
            inner = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner, BaseException) and _errno(inner):
                return _errno(inner)
        match = re.search(r"os error (\d+)", str(error))
        if match:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _is_failure(error: BaseException) -> bool:
    """An Exception, or torch.distributed.checkpoint's CheckpointException (a BaseException; not imported here: slow)."""
    return isinstance(error, Exception) or type(error).__module__.startswith("torch.distributed.checkpoint")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(error).__name__


def _attempt(action: Callable[[], Any], what: Path) -> _Failure | None:
    """Run `action` (writing `what`); a failure of any kind becomes one line, "the disk is full" where it is."""
    try:
        action()
        return None
    except _FileWriteError as error:
        what, cause = error.path, error.cause
    except BaseException as error:  # any writer's exception: the save failed and must be undone
        if not _is_failure(error):
            raise
        cause = error
    number = _errno(cause)
    if number in DISK_FULL_ERRNOS:
        return _Failure(f"the disk is full ({os.strerror(number)} writing {what})", disk_full=True)
    reason = os.strerror(number) if number else _first_line(cause)
    return _Failure(f"writing {what} failed ({reason})")


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


def _sum(path: Path, *, sync: bool = False) -> dict[str, int]:
    """Size and CRC-32 of a file, read in chunks; with `sync`, the file is fsynced on the way."""
    crc, size, buffer = 0, 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as file:
        while count := file.readinto(buffer):
            crc, size = zlib.crc32(view[:count], crc), size + count
        if sync:
            os.fsync(file.fileno())
    return {"size": size, "crc32": crc}


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
) -> Path:
    """Write the checkpoint after `step` updates atomically; every rank must call this. Returns its folder.

    `sharded`: the model was sharded with FSDP2; every rank writes its shards with torch.distributed.checkpoint.
    Raises CheckpointSaveError on every rank when any rank failed; nothing of the failed save is left.
    """
    save_dir = Path(save_dir)
    final = checkpoint_path(save_dir, step)
    temporary, stale = save_dir / f"{TEMPORARY}{final.name}", save_dir / f"{OLD}{final.name}"
    world = _world()

    def prepare() -> None:
        save_dir.mkdir(parents=True, exist_ok=True)
        _tidy(save_dir)
        temporary.mkdir()

    failure = _agree(_attempt(prepare, temporary) if rank == 0 else None)
    if failure is None and sharded:  # collective: it fails on every rank when one rank fails
        import torch.distributed.checkpoint as dcp

        failure = _attempt(lambda: dcp.save(_sharded_state(model, optimizer), checkpoint_id=temporary / "sharded"),
                           temporary / "sharded")
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
    failure = _agree(failure)

    if failure is None:  # read every file back: CRC-32 and fsync, the files split over the ranks
        names = _share(sorted(str(p.relative_to(temporary)) for p in temporary.rglob("*") if p.is_file())
                       if rank == 0 else None)
        sums: dict[str, dict[str, int]] = {}
        failure = _agree(_attempt(lambda: sums.update({name: _sum(temporary / name, sync=True)
                                                       for name in names[rank::world]}), temporary))
    if failure is None:
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, sums)
            sums = {name: entry for part in gathered for name, entry in part.items()}

        def commit() -> None:
            manifest = {"format": 1, "step": step, "world_size": world, "files": dict(sorted(sums.items()))}
            _write(temporary / MANIFEST, lambda file: file.write((json.dumps(manifest, indent=1) + "\n").encode()))
            mask = _umask()
            for path in [temporary, *temporary.rglob("*")]:
                path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
                if path.is_dir():
                    _sync_folder(path)
            if final.exists():  # a re-save of the same step: swap the new one in, then drop the old
                final.rename(stale)
            temporary.rename(final)  # the commit: from here on the new checkpoint is complete

        failure = _share(_attempt(commit, temporary / MANIFEST) if rank == 0 else None)
        if failure is None and rank == 0:  # after the commit: best effort, the checkpoint stands either way
            shutil.rmtree(stale, ignore_errors=True)
            try:
                _sync_folder(save_dir)
            except OSError:
                pass
    if failure is not None:
        _barrier()  # every rank has stopped writing
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            if stale.exists() and not final.exists():
                stale.rename(final)
        _barrier()
        newest = newest_checkpoint(save_dir)
        raise CheckpointSaveError(
            f"checkpoint {final} was not saved: {failure.text}; its temporary folder was removed and the newest "
            f"complete checkpoint is {newest or 'none (this was the first save)'}"
            + (f": free space, then resume with --continue_from {save_dir}" if newest else ""),
            disk_full=failure.disk_full)
    _barrier()
    return final


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


# ----------------------------------------------------------------------------- loading


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} state dicts of DTensor shards, keyed by parameter names (DCP's own helpers)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def verify_sums(checkpoint: str | Path, names: list[str] | None = None) -> str | None:
    """The first file of `names` (default: all) whose size or CRC-32 differs from the manifest, as one line; else None."""
    checkpoint = Path(checkpoint)
    try:
        manifest = _manifest(checkpoint)
    except ValueError as error:
        return str(error)
    if manifest is None:
        return None
    for name in sorted(manifest["files"]) if names is None else names:
        expected, path = manifest["files"][name], checkpoint / name
        try:
            found = _sum(path)
        except OSError as error:
            return f"{path}: unreadable ({error.strerror or error})"
        if found != {"size": expected["size"], "crc32": expected["crc32"]}:
            return (f"{path}: corrupt (CRC-32 {found['crc32']:08x} over {found['size']} bytes, the manifest says "
                    f"{expected['crc32']:08x} over {expected['size']})")
    return None


def load_checkpoint(
    checkpoint: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check every file's CRC-32, then load weights and optimizer state in place; return (trainer_state, rank_state).

    Every rank must call this. A damaged or unloadable file raises CheckpointError naming it, on every rank.
    The caller restores the data stream and the RNG from rank_state (restore_rng) and the counters from
    trainer_state.
    """
    checkpoint = Path(checkpoint)
    try:
        manifest = _manifest(checkpoint)
    except ValueError:  # verify_sums reports it
        manifest = None
    mine = sorted(manifest["files"])[rank::_world()] if manifest else None  # each rank sums its share
    failure = _agree(_Failure(problem) if (problem := verify_sums(checkpoint, mine)) else None)
    if failure is not None:
        raise CheckpointError(failure.text)

    current = checkpoint
    result: dict[str, Any] = {}

    def load() -> None:
        nonlocal current
        if is_sharded(checkpoint):  # every rank reads its own shards into the sharded model and optimizer
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            current = checkpoint / "sharded"
            state = _sharded_state(model, optimizer)
            dcp.load(state, checkpoint_id=current)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            device = next(model.parameters()).device
            current = checkpoint / "model.safetensors"
            load_model(model, current, strict=True, device=str(device))
            current = checkpoint / "optimizer.pt"
            optimizer.load_state_dict(torch.load(current, map_location=device, weights_only=True))
        current = checkpoint / "trainer.pt"
        result["trainer"] = torch.load(current, weights_only=True)
        current = rank_file(checkpoint, rank)
        result["rank"] = torch.load(current, weights_only=True)

    try:
        load()
        failure = None
    except BaseException as error:  # loaders raise many types (RuntimeError, SafetensorError, KeyError, ...)
        if not _is_failure(error):
            raise
        failure = _Failure(f"{current}: cannot be loaded into this run ({_first_line(error)})")
    failure = _agree(failure)
    if failure is not None:
        raise CheckpointError(failure.text)
    return result["trainer"], result["rank"]


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """The RNG states of torch (and cuda), python `random` and numpy, as tensors and numbers."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
