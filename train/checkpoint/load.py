"""Reading a checkpoint back: the shapes check against a (meta) model (`check_fits`), the CRC-32 check
(`verify_sums`), loading in place on every rank (`load_checkpoint`), and the RNG states (`capture_rng`,
`restore_rng`).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import nn

from train.checkpoint.format import (CheckpointError, Failure, agree, file_sum, first_line, is_failure, is_sharded,
                                     rank_file, read_manifest, safetensors_header, sharded_state)
from train.distributed import world_size




# ----------------------------------------------------------------------------- loading




# ----------------------------------------------------------------------------- RNG


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
            raise CheckpointError(f"{file}: unreadable ({first_line(error)})") from None
        saved = {key[len("model."):]: tuple(entry.size) for key, entry in entries.items()
                 if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    else:
        file = checkpoint / "model.safetensors"
        try:
            saved = {name: shape for name, (_, shape) in safetensors_header(file).items()}
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file}: {first_line(error)}") from None
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
        raise CheckpointError(f"{file}: unreadable ({first_line(error)})") from None
    layout = _optimizer_layout(optimizer.state_dict())
    if saved_layout != layout:
        raise CheckpointError(f"{file}: parameter groups {saved_layout} do not match this optimizer's {layout}; "
                              "was --optimizer or the model changed?")



# ----------------------------------------------------------------------------- loading


def verify_sums(checkpoint: str | Path, names: list[str] | None = None) -> str | None:
    """The first file of `names` (default: all) whose size or CRC-32 differs from the manifest, as one line; else None."""
    checkpoint = Path(checkpoint)
    try:
        manifest = read_manifest(checkpoint)
    except ValueError as error:
        return str(error)
    if manifest is None:
        return None
    for name in sorted(manifest["files"]) if names is None else names:
        expected, path = manifest["files"][name], checkpoint / name
        try:
            found = file_sum(path)
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
        manifest = read_manifest(checkpoint)
    except ValueError:  # verify_sums reports it
        manifest = None
    mine = sorted(manifest["files"])[rank::world_size()] if manifest else None  # each rank sums its share
    failure = agree(Failure(problem) if (problem := verify_sums(checkpoint, mine)) else None)
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
            state = sharded_state(model, optimizer)
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
        if not is_failure(error):
            raise
        failure = Failure(f"{current}: cannot be loaded into this run ({first_line(error)})")
    failure = agree(failure)
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
