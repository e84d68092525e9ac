r"""What every optimizer here shares: hyper-parameter checks, checked param groups, the ``step(closure)``
prologue, the int8 ``zero_grad`` and the dtype-keeping ``load_state_dict``. The math is elsewhere (pure
functions in each optimizer's module); a class says only what is its own:

- ``_check_group(group, name)``: its group keys, checked with one-line ValueErrors (the shared ones through
  `check_hyperparameters`); a group that fails is not kept;
- ``_step_parameters()``: one update of every parameter with a gradient (`step` evaluates the closure first,
  under ``torch.enable_grad()``, and returns its loss, as torch.optim does);
- ``group_label``: the word in front of a group's name in its errors (``"SCALE param group 'x'"``).

`BaseOptimizer` is a `torch.optim.Optimizer`; `CheckedGroups` alone is the part a wrapper of another
library's optimizer (bitsandbytes' AdamW8bit) can take.

The shared rules (`check_hyperparameters`): :math:`\eta \ge 0` (a number, or a one-element tensor),
:math:`\beta_1, \beta_2 \in [0, 1)` (exactly two), :math:`\epsilon \ge 0`, :math:`\lambda \ge 0`.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping

import torch
from torch.optim import Optimizer

from . import quant
from .state_dtypes import restore_saved_dtypes

#: The hyper-parameters every optimizer here takes, in the order they are checked.
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
#: How a failed check reads. "group" (the harness's): ``"{where}: eps must be >= 0, got -1.0"``;
#: "torch" (torch.optim's lines, kept by the APOLLO/GaLore/Fira constructor): ``"Invalid eps: -1.0 (must be >= 0)"``;
#: "adam_mini" (Adam-mini's since its first version): ``"{where}: invalid eps -1.0 (must be >= 0)"``.
WORDINGS = ("group", "torch", "adam_mini")


def _nonnegative(value: Any) -> bool:
    if isinstance(value, torch.Tensor):  # a tensor lr (torch.optim accepts one-element tensors)
        return value.numel() == 1 and bool(value >= 0)
    return isinstance(value, numbers.Real) and value >= 0  # False for NaN


def _is_beta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and bool(0 <= value < 1)
    return isinstance(value, numbers.Real) and 0 <= value < 1


def check_hyperparameters(values: Mapping[str, Any], where: str = "", *, keys: Iterable[str] = HYPERPARAMETERS,
                          wording: str = "group") -> None:
    """One-line ValueError for the first of `keys` in `values` that breaks its rule (module docstring).

    `where` names the optimizer or group (it starts the line); `wording` is one of `WORDINGS`.
    """
    prefix = f"{where}: " if where else ""
    for key in keys:
        value = values[key]
        if key == "betas":
            betas = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if len(betas) == 2 and all(_is_beta(beta) for beta in betas):
                continue
            if wording == "group":
                raise ValueError(f"{prefix}betas must be two numbers in [0, 1), got {value!r}")
            if len(betas) != 2:
                raise ValueError(f"{prefix}betas must be two numbers (beta1, beta2), got {value!r}")
            index, beta = next((i, b) for i, b in enumerate(betas, start=1) if not _is_beta(b))
            if wording == "torch":
                raise ValueError(f"{prefix}Invalid beta{index}: {beta} (must be in [0, 1))")
            raise ValueError(f"{prefix}invalid beta{index} {beta} (must be in [0, 1))")
        if _nonnegative(value):
            continue
        label = "learning rate" if key == "lr" else key
        if wording == "group":
            raise ValueError(f"{prefix}{key} must be >= 0, got {value!r}")
        if wording == "torch":
            raise ValueError(f"{prefix}Invalid {label}: {value} (must be >= 0)")
        raise ValueError(f"{prefix}invalid {label} {value} (must be >= 0)")


class CheckedGroups:
    """Mixin for a torch optimizer: each added param group is checked by ``_check_group(group, name)`` after
    torch has filled in its defaults, and removed again when the check raises."""

    #: Put in front of a group's name in error lines ("SCALE" -> "SCALE param group 'x'"); "" for none.
    group_label = ""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._check_group(group, self._group_name(group, index))
        except ValueError:
            self.param_groups.pop()  # an optimizer never keeps a group it refused
            raise

    def _group_name(self, group: dict[str, Any], index: int) -> str:
        """``param group 'name'`` for a named group, ``param_groups[index]`` otherwise (after `group_label`)."""
        label = f"{self.group_label} " if self.group_label else ""
        return f"{label}param group {group['name']!r}" if "name" in group else f"{label}param_groups[{index}]"

    def _check_group(self, group: dict[str, Any], name: str) -> None:
        """Check (and normalise in place) the keys of a newly added group; ValueError names `name`."""


class BaseOptimizer(CheckedGroups, Optimizer):
    """A torch optimizer with checked groups, the closure prologue, int8 gradients and dtype-keeping loads."""

    #: After torch's load_state_dict, give floating state tensors back the dtype they were saved in (torch casts
    #: them to the parameter's: float32 moments of a bfloat16 weight would be rounded).
    keep_saved_dtypes = True

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_parameters()
        return loss

    def step_options(self) -> dict:
        """The constructor's keyword options that are not group keys (how the step is computed, e.g. ``fused``):
        what another optimizer of this class needs to step as this one does (`LayerwiseOptimizer` builds one per
        parameter). None here; subclasses with such options return them."""
        return {}

    def _step_parameters(self) -> None:
        """One update of every parameter that has a gradient (under no_grad)."""
        raise NotImplementedError(f"{type(self).__name__} defines no update")

    def _gradient(self, param: torch.Tensor) -> torch.Tensor | None:
        """``param.grad``, or ``float_grad`` of an int8 weight (None: no gradient); sparse ones are refused."""
        grad = quant.gradient(param)
        if grad is not None and grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` as torch does, and drop ``float_grad`` of int8 weights."""
        super().zero_grad(set_to_none)
        quant.clear_float_grads(p for group in self.param_groups for p in group["params"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load; then floating state tensors keep the dtype they were saved in (`keep_saved_dtypes`)."""
        super().load_state_dict(state_dict)
        if self.keep_saved_dtypes:
            restore_saved_dtypes(self, state_dict)
