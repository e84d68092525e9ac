r"""Layer-wise (per-parameter) updates: each weight is updated during backward, as soon as its gradient exists.

`LayerwiseOptimizer(model, name, lr, ...)` builds one optimizer per trainable parameter (and, with
``lr_lambda``, one ``LambdaLR``), hooks it on ``register_post_accumulate_grad_hook`` (or the
QuantLinear equivalent for int8 weights), and in the hook: steps that optimizer, steps its
scheduler, and frees the gradient. Full-model gradients never exist at once: the gradient memory
of a step is that of the largest single parameter instead of the whole model (ALGORITHMS.md,
"Layer-wise updates"). Usage::

    optimizer = LayerwiseOptimizer(model, "apollo_mini", lr=0.01, lr_lambda=schedule)
    loss = model(**batch).loss
    loss.backward()          # every parameter is updated in here
    optimizer.step()         # bookkeeping only: the gradient norm of this update
    optimizer.zero_grad()    # nothing left to free

Equivalence with the joint optimizer: every update here is per-parameter in the joint optimizer too
(APOLLO/GaLore loop over parameters; torch's AdamW on the CPU runs its single-tensor path), and each
per-parameter low-rank group carries ``initial_seed`` = the parameter's 1-based position in the joint
optimizer, so it draws the same random projections. Updating a weight inside backward is safe
because every LLaMA weight is used once per forward: its backward node (which reads the weight)
has already run when its gradient is accumulated.

What this mode cannot do (see `check_layerwise`): accumulate gradients over micro-batches, clip
the global gradient norm, average gradients across data-parallel ranks, or skip an update after a
NaN loss (the update already happened in backward).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from . import quant
from .base import BaseOptimizer
from .registry import build_optimizer


def check_layerwise(*, gradient_accumulation: int = 1, grad_clipping: float = 0.0, world_size: int = 1,
                    nan_policy: str = "stop") -> None:
    """Raise ValueError (one line naming the flag to change) for a run layer-wise updates cannot do."""
    if gradient_accumulation != 1:
        raise ValueError(f"--layerwise updates every weight during backward, so gradients cannot be accumulated: "
                         f"set --gradient_accumulation 1 (got {gradient_accumulation}; --total_batch_size must equal "
                         f"--batch_size)")
    if grad_clipping:
        raise ValueError(f"--layerwise cannot clip the global gradient norm (each weight is updated before the others' "
                         f"gradients exist): set --grad_clipping 0 (got {grad_clipping})")
    if world_size != 1:
        raise ValueError(f"--layerwise runs on one process (gradients would be averaged across ranks only after the "
                         f"per-parameter updates): use --single_gpu and one process (got {world_size})")
    if nan_policy != "stop":
        raise ValueError("--layerwise applies each update during backward, so a NaN loss cannot be skipped: "
                         "use --nan_policy stop")


class LayerwiseOptimizer:
    """One optimizer (and scheduler) per parameter, stepped from gradient hooks during backward.

    ``name``, ``lr``, ``weight_decay`` and ``options`` are those of `apollo.build_optimizer`, which
    decides the param groups (low-rank or not) and settings exactly as for the joint optimizer.
    ``lr_lambda(step) -> multiplier`` (optional) drives one ``LambdaLR`` per parameter, stepped
    after each update; without it, set ``group["lr"]`` in ``param_groups`` yourself before backward,
    as with any optimizer.
    """

    def __init__(self, model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                 lr_lambda: Callable[[int], float] | None = None, **options: Any):
        joint = build_optimizer(name, model, lr=lr, weight_decay=weight_decay, **options)
        names = {id(p): n for n, p in model.named_parameters()}
        self.names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[LambdaLR] = []
        self._handles = []
        position = 0
        for group in joint.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for index, param in enumerate(group["params"]):
                position += 1
                if not (param.requires_grad or quant.is_quantized(param)):
                    continue  # frozen (torch's AdamW takes every parameter): no gradient, no hook
                single = dict(settings, params=[param])
                if group.get("rank") is not None:  # the joint optimizer's seed rule (APOLLO._initial_seed)
                    single["initial_seed"] = group.get("initial_seed", position - index) + index
                # how the joint optimizer computes its step (fused, elementwise: not group keys) carries over
                options_of_step = joint.step_options() if isinstance(joint, BaseOptimizer) else {}
                optimizer = type(joint)([single], **options_of_step)
                self.names.append(names[id(param)])
                self.optimizers.append(optimizer)
                if lr_lambda is not None:
                    self.schedulers.append(LambdaLR(optimizer, lr_lambda))
                hook = self._make_hook(len(self.optimizers) - 1)
                self._handles.append(quant.register_post_accumulate_grad_hook(param, hook))
        self._grad_sq = None  # sum of squared gradient norms of the current update, on the device
        self._last_grad_norm = None

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        optimizer = self.optimizers[index]
        scheduler = self.schedulers[index] if self.schedulers else None

        def hook(param: torch.Tensor) -> None:
            grad = quant.gradient(param)
            norm_sq = torch.linalg.vector_norm(grad).float().square()  # for logging; no host sync
            self._grad_sq = norm_sq if self._grad_sq is None else self._grad_sq + norm_sq
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # frees .grad (and float_grad of an int8 weight) at once
            if scheduler is not None:
                scheduler.step()

        return hook

    # ---------------------------------------------------------------- the optimizer interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every per-parameter group (the same dicts the hooks read), in model order."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The per-parameter states merged into one mapping (what `apollo.optimizer_state_bytes` reads)."""
        return {param: state for optimizer in self.optimizers for param, state in optimizer.state.items()}

    def step(self, closure=None):
        """Nothing to update (the hooks did it); closes the update's bookkeeping: its gradient norm."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_grad_norm = None if self._grad_sq is None else self._grad_sq.sqrt()
        self._grad_sq = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients were freed in the hooks; this only drops any a hook did not see."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """L2 norm over all parameters of the gradients of the last update (before it was applied)."""
        return self._last_grad_norm

    def get_last_lr(self) -> list[float]:
        """The lr each parameter's next update will use, in model order."""
        return [group["lr"] for group in self.param_groups]

    def remove_hooks(self) -> None:
        """Detach from the model (the model then trains with no updates until a new optimizer is built)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """{"names": [...], "optimizers": [...], "schedulers": [...]}: tensors and plain values only."""
        return {
            "names": list(self.names),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load every per-parameter optimizer and scheduler; the parameter names must match."""
        if state_dict["names"] != self.names:
            missing = sorted(set(self.names) - set(state_dict["names"]))
            extra = sorted(set(state_dict["names"]) - set(self.names))
            raise ValueError(f"layer-wise optimizer state does not match this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]} (or a different order)")
        if len(state_dict["schedulers"]) != len(self.schedulers):
            raise ValueError(f"layer-wise optimizer state has {len(state_dict['schedulers'])} schedulers, "
                             f"this optimizer {len(self.schedulers)} (was it built with the same lr_lambda setting?)")
        for optimizer, saved in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state_dict["schedulers"]):
            scheduler.load_state_dict(saved)
