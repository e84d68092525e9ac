r"""int8 weight storage (Q-APOLLO): a linear layer whose weight lives as asymmetric uint8 groups.

A weight W (PyTorch layout, out x in) is cut row-major into groups of ``group_size`` contiguous
elements. Per group, with :math:`w_{min}, w_{max}` its extremes (ALGORITHMS.md, "int8 weights"):

.. math::
    s = \max(w_{max} - w_{min}, 10^{-5}) / 255,\quad
    z = \mathrm{clamp}(-\mathrm{round}(w_{min}/s), 0, 255),\quad
    q = \mathrm{clamp}(\mathrm{round}(w/s) + z, 0, 255),\quad
    \hat w = (q - z)\, s

Round-to-nearest keeps :math:`|\hat w - w| \le s/2` for every group that contains both signs (or a
zero); a group of one sign is clipped at one end, as in the formula. Stochastic rounding replaces
round(x) by floor(x + u), u ~ U[0, 1): x rounds up with probability frac(x), so E[q] = x + z.

`QuantLinear` stores q (uint8, shape of W), s (float32, one per group) and z (uint8, one per group):
1 byte per element plus 5 bytes per group. Its forward dequantises into the input's dtype; the
weight gradient goes into a float buffer ``weight.float_grad`` (torch cannot attach a gradient to a
uint8 tensor), accumulated over micro-batches like ``.grad``. The uint8 weight is an ``nn.Parameter``
with ``requires_grad=False``: it stays in ``model.parameters()``, state dicts and checkpoints under
its usual name, and ``torch.optim.Optimizer`` accepts it. The APOLLO / GaLore optimizers update it
through `float_weight`: dequantise to float32, update, re-quantise (round-to-nearest, or stochastic
with a seeded generator: the seed of each re-quantisation is (layer seed, update count), both kept in
the module's ``rounding_state`` buffer, so a resumed run rounds exactly as an uninterrupted one).
Under DDP the float gradients are not seen by DDP's reducer: call `all_reduce_quantized_grads`
after the backward pass of the last micro-batch.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (8,)
QMAX = 255  # 2^8 - 1 levels
MIN_RANGE = 1e-5  # a constant group still gets a positive scale

# -------------------------------------------------------------------------------- the arithmetic


def _check_groups(numel: int, group_size: int, what: str = "weight") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if numel % group_size:
        raise ValueError(f"{what} has {numel} elements, not divisible by group_size {group_size}; "
                         f"choose a group size that divides every quantised weight (e.g. 64 or 128)")
    return numel // group_size


def quantize(
    weight: torch.Tensor, group_size: int, *, generator: torch.Generator | None = None, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W -> (q uint8 of W's shape, scales float32 (groups, 1), zeros uint8 (groups, 1)).

    Round to nearest without a generator; stochastic rounding (up with probability = fractional
    part) with one. ``overwrite=True`` lets a contiguous float32 `weight` (a scratch copy the caller
    is done with) be used as the work buffer, saving one weight-sized float32 temporary. Works on any
    device, meta included (shapes only).
    """
    groups = _check_groups(weight.numel(), group_size)
    if weight.device.type == "meta":  # shapes only (train.memory): meta arithmetic is slow and says nothing
        return (torch.empty(weight.shape, dtype=torch.uint8, device="meta"),
                torch.empty(groups, 1, dtype=torch.float32, device="meta"),
                torch.empty(groups, 1, dtype=torch.uint8, device="meta"))
    in_place = overwrite and weight.dtype == torch.float32 and weight.is_contiguous()
    work = weight.detach().reshape(groups, group_size)  # (G, group_size)
    work = work if in_place else work.to(torch.float32, copy=True)
    low, high = work.amin(dim=1, keepdim=True), work.amax(dim=1, keepdim=True)
    scales = (high - low).clamp_(min=MIN_RANGE).div_(QMAX)
    zeros = torch.round(low.div_(scales)).neg_().clamp_(0, QMAX)
    work.div_(scales)
    if generator is None:
        work.round_()
    else:
        work.add_(torch.rand(work.shape, generator=generator, device=work.device, dtype=work.dtype)).floor_()
    q = work.add_(zeros).clamp_(0, QMAX).to(torch.uint8)
    return q.reshape(weight.shape), scales, zeros.to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - z) * s in float32, reshaped to q's shape, then cast to `dtype`."""
    if q.device.type == "meta":
        return torch.empty(q.shape, dtype=dtype, device="meta")
    groups = q.reshape(scales.shape[0], -1).to(torch.float32)
    weight = groups.sub_(zeros.to(torch.float32)).mul_(scales.to(torch.float32)).reshape(q.shape)
    return weight if dtype == torch.float32 else weight.to(dtype)


# ------------------------------------------------------------------------------------ the layer


class _QuantLinearFunction(torch.autograd.Function):
    """y = x Ŵ^T + b with Ŵ dequantised from uint8; Ŵ is rebuilt in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x, layer, q, scales, zeros, bias):
        ctx.layer = layer
        ctx.save_for_backward(x, q, scales, zeros)  # q's version counter guards against an update before backward
        return F.linear(x, dequantize(q, scales, zeros, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, q, scales, zeros = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize(q, scales, zeros, grad_out.dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        ctx.layer._accumulate_weight_grad(flat_grad.T @ x.reshape(-1, x.shape[-1]))  # (out, in)
        if ctx.needs_input_grad[5]:
            grad_bias = flat_grad.sum(0)
        return grad_x, None, None, None, None, grad_bias


class QuantLinear(nn.Module):
    """A linear layer with a uint8 weight in groups of `group_size` (see the module docstring).

    Parameters: ``weight`` (uint8, requires_grad False, its gradient in ``weight.float_grad``) and an
    optional float ``bias``. Buffers: ``weight_scales`` (float32, (groups, 1)), ``weight_zeros``
    (uint8, (groups, 1)), ``rounding_state`` (int64 [seed, re-quantisations so far]).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int = 128,
        bits: int = 8,
        stochastic_round: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"weight bits must be 8 (only 8-bit weights are supported), got {bits!r}")
        groups = _check_groups(in_features * out_features, group_size, f"a {out_features} x {in_features} weight")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits, self.stochastic_round = group_size, bits, bool(stochastic_round)
        self.compute_dtype = dtype or torch.get_default_dtype()  # dtype of float_grad (and of the layer it replaced)
        q = torch.zeros(out_features, in_features, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("weight_scales", torch.ones(groups, 1, dtype=torch.float32, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, 1, dtype=torch.uint8, device=device))
        self.register_buffer("rounding_state", torch.tensor([seed, 0], dtype=torch.int64, device=device))
        self._rounding: list[int] | None = [seed, 0]  # host copy of rounding_state: no device sync per update
        self._weight_grad_hooks: OrderedDict[int, Callable[[torch.Tensor], None]] = OrderedDict()
        self._link_weight()

    def _link_weight(self) -> None:
        """Let the optimizer find this layer from its weight (see `quantized_linear`)."""
        self.weight._quant_linear = self
        self.weight.float_grad = None

    def __setstate__(self, state):
        # deepcopy / pickle rebuild the Parameter without its Python attributes: link it again
        super().__setstate__(state)
        self._link_weight()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 128, bits: int = 8,
                    stochastic_round: bool = False, seed: int = 0) -> "QuantLinear":
        """Quantise an `nn.Linear` (round to nearest) into a new layer on the same device."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                    bits=bits, stochastic_round=stochastic_round, seed=seed, device=weight.device,
                    dtype=weight.dtype)
        q, scales, zeros = quantize(weight, group_size)
        with torch.no_grad():
            layer.weight.copy_(q)
            layer.weight_scales.copy_(scales)
            layer.weight_zeros.copy_(zeros)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = (q - z) s as a new tensor of `dtype`."""
        return dequantize(self.weight, self.weight_scales, self.weight_zeros, dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor, *, overwrite: bool = False) -> None:
        """Store float `weight` (after an optimizer update) as the new q, s, z, in place.

        ``overwrite=True``: `weight` is scratch and may be destroyed (see `quantize`). Stochastic
        rounding draws from a generator seeded with (layer seed, update count) on the weight's
        device; the count is advanced, so a resumed run continues the same sequence.
        """
        generator = None
        if self.stochastic_round and weight.device.type != "meta":
            generator = torch.Generator(device=weight.device)
            generator.manual_seed(self._next_rounding_seed())
        q, scales, zeros = quantize(weight, self.group_size, generator=generator, overwrite=overwrite)
        self.weight.copy_(q)
        self.weight_scales.copy_(scales)
        self.weight_zeros.copy_(zeros)

    def _next_rounding_seed(self) -> int:
        """(layer seed << 32) + update count, then count += 1 in the host copy and the buffer."""
        if self._rounding is None:  # after load_state_dict: one host read
            self._rounding = [int(v) for v in self.rounding_state.tolist()]
        seed, count = self._rounding
        self._rounding[1] = count + 1
        self.rounding_state[1] = count + 1  # a scalar fill, no host sync
        return ((seed << 32) + count) % (2**63)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._rounding = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFunction.apply(x, self, self.weight, self.weight_scales, self.weight_zeros, self.bias)

    # gradients -------------------------------------------------------------------------------
    def _accumulate_weight_grad(self, grad: torch.Tensor) -> None:
        """Add a weight gradient into weight.float_grad, then run the post-accumulate hooks."""
        weight = self.weight
        if weight.float_grad is None:
            weight.float_grad = grad  # freshly allocated by backward: take it without a copy
        else:
            weight.float_grad.add_(grad)
        for hook in tuple(self._weight_grad_hooks.values()):
            hook(weight)

    def register_weight_grad_hook(self, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
        """Like ``Tensor.register_post_accumulate_grad_hook``: ``hook(weight)`` after float_grad is updated."""
        handle = RemovableHandle(self._weight_grad_hooks)
        self._weight_grad_hooks[handle.id] = hook
        return handle

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, stochastic_round={self.stochastic_round}")


# ------------------------------------------------------------------------- helpers for callers


def quantized_linear(param: torch.Tensor) -> QuantLinear | None:
    """The QuantLinear that stores `param` as uint8, or None for an ordinary parameter."""
    return getattr(param, "_quant_linear", None)


def is_quantized(param: torch.Tensor) -> bool:
    return quantized_linear(param) is not None


def gradient(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient an optimizer should use: ``param.grad``, or ``float_grad`` of a uint8 weight."""
    return param.grad if param.grad is not None else getattr(param, "float_grad", None)


@contextmanager
def float_weight(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield a float tensor to update in place: `param` itself, or a float32 Ŵ re-quantised on exit."""
    layer = quantized_linear(param)
    if layer is None:
        yield param
        return
    weight = layer.dequantized_weight(torch.float32)
    yield weight
    layer.requantize_(weight, overwrite=True)  # the float32 copy is ours: quantise in its memory


def register_post_accumulate_grad_hook(param: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """``param.register_post_accumulate_grad_hook(hook)``, or the same from a QuantLinear's backward."""
    layer = quantized_linear(param)
    if layer is None:
        return param.register_post_accumulate_grad_hook(hook)
    return layer.register_weight_grad_hook(hook)


def clear_float_grads(params) -> None:
    """Drop ``float_grad`` of every uint8 weight in `params` (the counterpart of ``zero_grad``)."""
    for param in params:
        if is_quantized(param):
            param.float_grad = None


def quantize_model(
    model: nn.Module,
    target_modules: str | tuple[str, ...] | list[str] = ("attn", "mlp"),
    group_size: int = 128,
    bits: int = 8,
    stochastic_round: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Swap every `nn.Linear` that `target_modules` chooses (`apollo.routing`'s forms) for a QuantLinear.

    For LLaMA: q/k/v/o_proj and gate/up/down_proj; embeddings, lm_head and norms stay as they are.
    Every target's element count must divide by `group_size` (checked before anything is swapped).
    Layer i (1-based, in module order) rounds stochastically with seed `seed * 2^16 + i`. In place;
    returns `model`.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"--weight_bits must be 8 (only 8-bit weights are supported), got {bits!r}")
    from .routing import select_target_modules  # routing imports this module: imported here, no cycle
    targets = select_target_modules(model, target_modules, types=(nn.Linear,))
    if not targets:
        raise ValueError(f"quantize_model: target_modules {target_modules!r} selects no nn.Linear module")
    for name, module in targets:
        _check_groups(module.weight.numel(), group_size, f"{name}.weight {tuple(module.weight.shape)}")
    for index, (name, module) in enumerate(targets, start=1):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(module, group_size=group_size, bits=bits,
                                                       stochastic_round=stochastic_round,
                                                       seed=(seed << 16) + index))
    logger.info("quantize_model: %d linear layers stored as uint8 (group size %d, %s rounding)", len(targets),
                group_size, "stochastic" if stochastic_round else "nearest")
    return model


def quantized_weights(model: nn.Module) -> list[torch.Tensor]:
    """The uint8 weights of every QuantLinear in `model`, in module order."""
    return [module.weight for module in model.modules() if isinstance(module, QuantLinear)]


def gradients(model: nn.Module) -> list[torch.Tensor]:
    """Every gradient of `model`: ``.grad`` of float parameters and ``float_grad`` of uint8 weights."""
    return [g for g in (gradient(p) for p in model.parameters()) if g is not None]


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over `gradients(model)` (float_grad included); returns the norm.

    Scales every gradient by min(1, max_norm / (total norm + 1e-6)), as torch does.
    """
    grads = gradients(model)
    total = torch.nn.utils.get_total_norm(grads)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.device, grad.dtype))
    return total


def all_reduce_quantized_grads(model: nn.Module) -> None:
    """Average ``float_grad`` of every uint8 weight across data-parallel ranks (no-op on one process).

    DDP averages ``.grad`` only; call this after the backward pass of the last micro-batch, before
    clipping and the optimizer step. Like DDP's default hook, each rank divides by the world size and
    the results are summed. A rank that has no gradient for a weight contributes zeros.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    pending = []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            weight = module.weight
            if weight.float_grad is None:
                weight.float_grad = torch.zeros(weight.shape, dtype=module.compute_dtype, device=weight.device)
            pending.append(dist.all_reduce(weight.float_grad.div_(world), op=dist.ReduceOp.SUM, async_op=True))
    for work in pending:
        work.wait()
