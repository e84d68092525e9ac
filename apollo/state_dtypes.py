"""Optimizer-state dtypes shared by every optimizer here: the names a param group keeps, and a load that
keeps the dtypes a state dict was saved in.

torch's `Optimizer.load_state_dict` casts every floating state tensor to its parameter's dtype, which would
round float32 moments of a bfloat16 weight (``state_dtype="float32"``); `restore_saved_dtypes` undoes that.
"""
from __future__ import annotations

from itertools import chain
from typing import Any

import torch

#: name kept in a param group -> dtype (None: follow the parameter / gradient)
STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}


def state_dtype_name(state_dtype: torch.dtype | str | None, allowed=STATE_DTYPES, *, who: str = "") -> str | None:
    """A state dtype as the string a param group keeps (state dicts stay plain); ValueError outside `allowed`."""
    if isinstance(state_dtype, torch.dtype):
        state_dtype = str(state_dtype).removeprefix("torch.")
    if state_dtype not in allowed:
        names = "/".join(name for name in allowed if name)
        raise ValueError(f"{who + ': ' if who else ''}state_dtype must be None (follow the parameter) or one of "
                         f"{names}, got {state_dtype!r}")
    return state_dtype


#: What `apollo.optimizer_state_bytes` counts for a Python int or float kept in a state (a step count, a seed).
NUMBER_BYTES = 8


def state_element_size(group: dict, param: torch.Tensor) -> int:
    """Bytes of one state number of `param` in `group`: the group's ``state_dtype`` (a name or a dtype), else the
    weight's (the state-bytes formulas of the specs use it)."""
    dtype = group.get("state_dtype")
    dtype = STATE_DTYPES[dtype] if isinstance(dtype, str) or dtype is None else dtype
    return (dtype or param.dtype).itemsize


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After `Optimizer.load_state_dict(state_dict)`: floating state tensors get the dtype they were saved in."""
    saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
    params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
    for saved_id, param in zip(saved_ids, params):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                optimizer.state[param][key] = value.to(device=param.device, copy=True)
