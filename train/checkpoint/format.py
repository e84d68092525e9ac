"""What a checkpoint is on disk: names, the manifest, the cheap completeness checks, finding the newest.

A checkpoint is a folder `<save_dir>/step_<7 digits>/`; see the package docstring (train/checkpoint/__init__.py)
for its files. This module reads only: folder names, manifest.json, file sizes and headers (`damage`),
which folder to resume (`select_checkpoint`), and each file's size and CRC-32 (`file_sum`). It also holds
the one-line failure that every rank agrees on (`agree`), shared by saving and loading.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.distributed import all_gather_object

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
        return f"truncated or corrupt ({first_line(error)})"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
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
        raise ValueError(f"{path}: unreadable manifest ({first_line(error)})") from None
    return manifest


def damage(checkpoint: str | Path) -> str | None:
    """What is wrong with `checkpoint`, as one line naming the file, or None when it is complete.

    Cheap checks only (sizes and headers); the CRC-32 sums are checked when it is loaded.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return f"{checkpoint} is not a folder"
    try:
        manifest = read_manifest(checkpoint)
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



# ----------------------------------------------------------------------------- sums and failures


def file_sum(path: Path, *, sync: bool = False) -> dict[str, int]:
    """Size and CRC-32 of a file, read in chunks; with `sync`, the file is fsynced on the way."""
    crc, size, buffer = 0, 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as file:
        while count := file.readinto(buffer):
            crc, size = zlib.crc32(view[:count], crc), size + count
        if sync:
            os.fsync(file.fileno())
    return {"size": size, "crc32": crc}



@dataclass(frozen=True)
class Failure:
    text: str
    disk_full: bool = False



def agree(failure: Failure | None) -> Failure | None:
    """The first failure of any rank, on every rank (a collective: every rank must call it)."""
    return next((item for item in all_gather_object(failure) if item is not None), None)


def error_number(error: BaseException) -> int | None:
    """The OS error number behind `error`: its errno, its causes', or "os error N" in its text (the safetensors writer)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        for inner in getattr(error, "failures", {}).values():  # torch.distributed.checkpoint's CheckpointException
            inner = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner, BaseException) and error_number(inner):
                return error_number(inner)
        match = re.search(r"os error (\d+)", str(error))
        if match:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def is_failure(error: BaseException) -> bool:
    """An Exception, or torch.distributed.checkpoint's CheckpointException (a BaseException; not imported here: slow)."""
    return isinstance(error, Exception) or type(error).__module__.startswith("torch.distributed.checkpoint")


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(error).__name__



def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} state dicts of DTensor shards, keyed by parameter names (DCP's own helpers)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}

