"""Checkpoints: everything needed to resume a run exactly, written atomically, no pickled objects.

A checkpoint is a folder `<save_dir>/step_<7 digits>/` holding
    model.safetensors   the weights (safetensors)
    optimizer.pt        optimizer.state_dict()
    trainer.pt          step, tokens_seen, last_eval_step, world_size, the schedule's state
    rank_<5 digits>.pt  per rank: the data stream's position and the RNG states (torch, cuda, python, numpy)
    config.json         the resolved run config
or, for a sharded run (--fsdp), instead of model.safetensors and optimizer.pt
    sharded/            torch.distributed.checkpoint of {"model", "optimizer"}: every rank writes its own
                        shards (no gather to one rank); loadable with the same world size
Every .pt file holds tensors, numbers, strings, lists and dicts only: `torch.load(weights_only=True)`
reads it. The folder is written under a temporary name and renamed when complete, so a crash mid-save
never leaves a checkpoint that looks finished. With several processes every rank writes its own rank
file; model, optimizer and trainer state (identical on every rank) come from rank 0. The save folder
must be shared by all ranks.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from train.distributed import barrier

PREFIX = "step_"
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "trainer.pt", "config.json")
SHARDED_FILES = ("sharded/.metadata", "trainer.pt", "config.json")  # --fsdp: torch.distributed.checkpoint


def checkpoint_path(save_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after `step` updates lives."""
    return Path(save_dir) / f"{PREFIX}{step:07d}"


def rank_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank_{rank:05d}.pt"


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete checkpoint of a run folder; ValueError if none."""
    path = Path(path)
    if (path / "trainer.pt").is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted((p for p in path.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / "trainer.pt").is_file()),
                            key=lambda p: int(p.name[len(PREFIX):]))
    else:
        raise ValueError(f"{path} does not exist")
    if not candidates:
        raise ValueError(f"{path} holds no checkpoint (a {PREFIX}* folder with trainer.pt)")
    checkpoint = candidates[-1]
    required = SHARDED_FILES if is_sharded(checkpoint) else REQUIRED_FILES
    missing = [name for name in required if not (checkpoint / name).is_file()]
    if missing or not any(checkpoint.glob("rank_*.pt")):
        raise ValueError(f"checkpoint {checkpoint} is incomplete: missing {', '.join(missing) or 'rank_*.pt'}")
    return checkpoint


def is_sharded(checkpoint: Path) -> bool:
    """Whether `checkpoint` was written by a sharded (--fsdp) run."""
    return (Path(checkpoint) / "sharded").is_dir()


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} state dicts of DTensor shards, keyed by parameter names (DCP's own helpers)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint` (one rank file each)."""
    return len(list(Path(checkpoint).glob("rank_*.pt")))


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
    """
    final = checkpoint_path(save_dir, step)
    temporary = final.with_name(f".tmp-{final.name}")
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    torch.save(rank_state, rank_file(temporary, rank))
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, optimizer), checkpoint_id=temporary / "sharded")
    if rank == 0:
        if not sharded:
            save_model(model, str(temporary / "model.safetensors"))
            torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        torch.save(trainer_state, temporary / "trainer.pt")
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    barrier()
    if rank == 0:
        if final.exists():  # a re-save of the same step: swap the new one in, then drop the old
            stale = final.with_name(f".old-{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            temporary.rename(final)
            shutil.rmtree(stale)
        else:
            temporary.rename(final)
    barrier()
    return final


def load_checkpoint(
    checkpoint: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights and optimizer state in place; return (trainer_state, this rank's rank_state).

    The caller restores the data stream and the RNG from rank_state (restore_rng) and the counters from
    trainer_state.
    """
    checkpoint = Path(checkpoint)
    if is_sharded(checkpoint):  # every rank reads its own shards into the sharded model and optimizer
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _sharded_state(model, optimizer)
        dcp.load(state, checkpoint_id=checkpoint / "sharded")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        device = next(model.parameters()).device
        load_model(model, checkpoint / "model.safetensors", strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    trainer_state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    rank_state = torch.load(rank_file(checkpoint, rank), weights_only=True)
    return trainer_state, rank_state
