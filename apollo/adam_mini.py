r"""Adam-mini (arXiv 2406.16793): Adam's first moment, one second moment per block of parameters.

`partition(model, weight_decay)` decides every parameter's block rule (the one routing function),
`AdamMini` is the optimizer, `adam_mini_update` its math for one tensor, `build` the harness's door.
The math is PEERS.md's "Adam-mini" section; the published code was not read.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
from torch import nn

from . import scratch
from .spec import ADAM_MINI_PAPER_67M, OptimizerSpec
from . import quant, sharded
from .base import BaseOptimizer, check_hyperparameters
from .routing import check_coverage, trainable
from .state_dtypes import NUMBER_BYTES, state_dtype_name, state_element_size

logger = logging.getLogger(__name__)

#: elementwise: one v per number (Adam); head: one v per attention head (rows [h d, (h+1) d));
#: row: one v per output row / token; tensor: one v for the whole tensor.
BLOCKS = ("elementwise", "head", "row", "tensor")
STATE_DTYPES = {None: None, "float32": torch.float32}
#: The option keys `build` accepts (None or missing: the default in AdamMini.__init__).
OPTIONS = frozenset({"betas", "eps", "state_dtype"})

_HEAD_ROLES = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
_ROW_ROLES = frozenset({"v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


# ----------------------------------------------------------------------------------------- the math
def block_state_shape(shape: tuple[int, ...], *, block: str, num_heads: int | None) -> tuple[int, ...]:
    """Shape of v for a weight of (global) `shape`: one number per block."""
    if block == "elementwise":
        return tuple(shape)
    if block == "row":
        return (shape[0],)
    if block == "head":
        return (num_heads,)
    return ()


def _head_of_row(rows: int, offset: int, head_rows: int, device: torch.device) -> torch.Tensor:
    """Head index of each of this rank's rows offset, ..., offset + rows - 1."""
    return torch.div(torch.arange(offset, offset + rows, device=device), head_rows, rounding_mode="floor")


def block_mean_square(grad: torch.Tensor, *, block: str, num_heads: int | None, dtype: torch.dtype | None = None,
                      shard: sharded.RowShard | None = None) -> torch.Tensor:
    r"""mean_{i \in b} g_i^2 for every block b (the shape of v), computed in `dtype` (default: grad's).

    Squared norms, so no gradient-sized temporary exists except for elementwise blocks. `grad` is this
    rank's rows of a row-sharded gradient when `shard` is given: a head cut by the split and a
    whole-tensor block sum their squares over ranks (one all-reduce); rows are local.
    """
    dtype = dtype or grad.dtype
    rows = grad.shape[0] if grad.dim() else 1
    if block == "elementwise":
        return grad.to(dtype).square()
    total_shape = shard.shape if shard is not None else tuple(grad.shape)
    if block == "tensor":
        total = torch.linalg.vector_norm(grad, dtype=dtype).square()
        if shard is not None:
            shard.all_reduce(total)
        return total.div_(math.prod(total_shape))
    row_sums = torch.linalg.vector_norm(grad.reshape(rows, -1), dim=1, dtype=dtype).square_()
    columns = math.prod(total_shape[1:])
    if block == "row":
        return row_sums.div_(columns)
    head_rows = total_shape[0] // num_heads
    offset = shard.offset if shard is not None else 0
    sums = torch.zeros(num_heads, dtype=dtype, device=grad.device)
    sums.index_add_(0, _head_of_row(rows, offset, head_rows, grad.device), row_sums)
    if shard is not None:
        shard.all_reduce(sums)
    return sums.div_(head_rows * columns)


def _per_row(v: torch.Tensor, weight: torch.Tensor, *, block: str, num_heads: int | None,
             shard: sharded.RowShard | None) -> torch.Tensor:
    """v laid out to broadcast against this rank's `weight`."""
    if block in ("elementwise", "tensor"):
        return v
    trailing = [1] * (weight.dim() - 1)
    if block == "row":
        return v.view(weight.shape[0], *trailing)
    total_rows = shard.shape[0] if shard is not None else weight.shape[0]
    offset = shard.offset if shard is not None else 0
    heads = _head_of_row(weight.shape[0], offset, total_rows // num_heads, v.device)
    return v.index_select(0, heads).view(weight.shape[0], *trailing)


def adam_mini_update(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                     block: str, num_heads: int | None, step: int, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float, shard: sharded.RowShard | None = None) -> None:
    """One Adam-mini step of `weight` in place (AdamMini's docstring); `exp_avg`, `exp_avg_sq` in place.

    The moments' dtype is the computation's (a bf16 gradient is read into float32 moments without a
    copy); `weight` (any float dtype) receives the result. Scratch: the denominator, full-size only
    for elementwise blocks. Under a row `shard` every tensor is this rank's part (v of heads and
    whole tensors: the whole, replicated).
    """
    if grad.dtype == exp_avg.dtype:
        exp_avg.lerp_(grad, 1 - beta1)  # torch's AdamW
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    if block == "elementwise":
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # torch's AdamW, no temporary
    else:
        sample = block_mean_square(grad, block=block, num_heads=num_heads, dtype=exp_avg_sq.dtype, shard=shard)
        exp_avg_sq.mul_(beta2).add_(sample, alpha=1 - beta2)
    if weight_decay != 0:
        weight.mul_(1 - lr * weight_decay)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    v = _per_row(exp_avg_sq, weight, block=block, num_heads=num_heads, shard=shard)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# ---------------------------------------------------------------------------------- the optimizer
def _state_dtype_name(state_dtype: torch.dtype | str | None) -> str | None:
    return state_dtype_name(state_dtype, STATE_DTYPES, who="AdamMini")


class AdamMini(BaseOptimizer):
    r"""Adam-mini (arXiv 2406.16793): AdamW with one second moment per block of parameters.

    Each param group carries its block rule, ``block`` (``"elementwise"``, ``"head"`` with
    ``num_heads``, ``"row"`` or ``"tensor"``), so a group rebuilt alone behaves identically. For a
    parameter W with gradient :math:`g_t` and blocks :math:`b` (a head: rows
    :math:`[h\,d_h, (h+1)\,d_h)` of a q/k weight viewed as ``(heads, head_dim * in)``; a row; the whole
    tensor; or each number):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \quad\text{(full size)}\\
        v_{b,t} &= \beta_2 v_{b,t-1} + (1-\beta_2)\, \tfrac{1}{|b|}\textstyle\sum_{i\in b} g_{t,i}^2\\
        W &\leftarrow (1-\eta\lambda)\, W - \eta\, \frac{m_t/(1-\beta_1^t)}{\sqrt{v_{b,t}}/\sqrt{1-\beta_2^t} + \epsilon}

    With every block elementwise this is ``torch.optim.AdamW`` up to round-off (ε on the bias-corrected
    :math:`\sqrt{v}`, as torch does; this repository's APOLLO AdamW adds it before the correction).
    Defaults: lr 1e-3, betas (0.9, 0.999), ε 1e-8, weight decay 0 (`partition` sets 0 for norms and
    biases); ``block`` has no default (use `partition`/`build` for a model).

    State per m x n weight: ``exp_avg`` (m n numbers), ``exp_avg_sq`` (#blocks: heads, m rows, 1, or
    m n when elementwise) and ``step`` (int): m n + #blocks numbers + 8 bytes, about half of AdamW's.
    ``state_dtype="float32"`` keeps both in float32 for bf16 weights (default: the gradient's dtype).

    Harness modes: meta-device steps (shapes only); int8 weights (`quant.QuantLinear`: its float32
    copy is updated and re-quantised, as APOLLO does); row-sharded DTensors (FSDP2 ``Shard(0)``): m
    and per-row/elementwise v are sharded like the rows, v of heads and whole tensors is replicated
    and its sums of squares all-reduced (a head cut by the split included), so the update equals the
    unsharded one.

    Deliberate differences from the published code (PEERS.md): the partition is decided from the
    model's config and module types (`partition`; names only tell q/k/v/... apart); ε defaults to
    1e-8, the value the published numbers use (its docstring's 1e-6 is wrong); ``state_dtype``;
    the state dict holds tensors and ints only.
    """

    group_label = "AdamMini"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, block: str | None = None,
                 num_heads: int | None = None, state_dtype: torch.dtype | str | None = None):
        check_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), "AdamMini",
                              wording="adam_mini")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block=block,
                        num_heads=num_heads, state_dtype=_state_dtype_name(state_dtype))
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        check_hyperparameters(group, where, wording="adam_mini")
        group["betas"] = tuple(group["betas"])
        group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        block, heads = group["block"], group["num_heads"]
        if block not in BLOCKS:
            raise ValueError(f"{where}: block must be one of {BLOCKS}, got {block!r} "
                             "(apollo.adam_mini.partition(model) decides it for a model)")
        if block == "head" and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"{where}: block 'head' needs num_heads, an integer >= 1, got {heads!r}")
        for position, param in enumerate(group["params"]):
            if block in ("row", "head") and param.dim() < 2:
                raise ValueError(f"{where}: block {block!r} takes weights of 2 or more dimensions; "
                                 f"parameter {position} has shape {tuple(param.shape)}")
            if block == "head" and param.shape[0] % heads:
                raise ValueError(f"{where}: {param.shape[0]} rows of parameter {position} do not split into "
                                 f"{heads} heads")

    def _init_state(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                    state: dict[str, Any]) -> None:
        """Zero m (the weight's shape) and v (one per block), laid out like a sharded weight's rows."""
        dtype = STATE_DTYPES[group["state_dtype"]] or grad.dtype
        block = group["block"]
        v_shape = block_state_shape(tuple(param.shape), block=block, num_heads=group["num_heads"])
        state["step"] = 0
        state["exp_avg"] = sharded.zeros_like_layout(param, tuple(param.shape), rows_sharded=True, dtype=dtype,
                                                     device=grad.device)
        state["exp_avg_sq"] = sharded.zeros_like_layout(param, v_shape, rows_sharded=block in ("elementwise", "row"),
                                                        dtype=dtype, device=grad.device)

    def _step_parameters(self) -> None:
        local = sharded.local
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = self._gradient(param)  # .grad, or float_grad of an int8 weight
                if grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, grad, group, state)
                state["step"] += 1
                with quant.float_weight(param) as weight:  # an int8 weight: its float32 copy, re-quantised
                    adam_mini_update(
                        local(weight), local(grad), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                        block=group["block"], num_heads=group["num_heads"], step=state["step"], lr=group["lr"],
                        beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        shard=sharded.row_shard(param),
                    )


# ------------------------------------------------------------------------------------ the routing
def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer by type (torch's, or a model's own *Norm class such as LlamaRMSNorm)."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, torch_norms) or type(module).__name__.endswith("Norm")


def partition(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Adam-mini's param groups for `model`: every trainable parameter gets its block rule, here only.

    - a ``bias`` -> elementwise (Adam), no decay;
    - the input and output embeddings (``get_input_embeddings()``/``get_output_embeddings()``, else
      any ``nn.Embedding``) -> one v per token (row);
    - a Linear (or int8 QuantLinear) weight named ``q_proj`` -> one v per head, ``num_attention_heads``
      of the config; ``k_proj`` -> one per kv head (``num_key_value_heads``, GQA); the row count must
      be heads x head_dim (``config.head_dim``, else hidden_size / heads) or a ValueError says so;
    - ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` weights -> one v per output row;
    - anything else -> one v per tensor; no decay for the parameters of normalisation layers.

    Coverage is checked (`routing.check_coverage`); the counts per group and per block kind are logged.
    """
    config = getattr(model, "config", None)
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter, lambda: None)()
        except NotImplementedError:  # a transformers model without that embedding
            module = None
        if module is not None and getattr(module, "weight", None) is not None:
            embeddings.add(id(module.weight))
    if not embeddings:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    by_key: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    blocks = {kind: [0, 0] for kind in BLOCKS}  # tensors, blocks
    no_decay = 0
    for module_name, module in model.named_modules():
        role = module_name.rpartition(".")[2]
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not trainable(param):
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            heads = None
            decay = weight_decay
            if param_name == "bias":
                key, block, decay = "biases", "elementwise", 0.0
            elif id(param) in embeddings:
                key, block = "embeddings", "row"
            elif isinstance(module, (nn.Linear, quant.QuantLinear)) and role in _HEAD_ROLES:
                key, block = role, "head"
                heads = _heads(config, role, name, tuple(param.shape))
            elif isinstance(module, (nn.Linear, quant.QuantLinear)) and role in _ROW_ROLES:
                key, block = "rows", "row"
            elif _is_norm(module):
                key, block, decay = "norms", "tensor", 0.0
            else:
                key, block = "tensors", "tensor"
            group = by_key.setdefault((key, heads), {"params": [], "name": key, "block": block, "num_heads": heads,
                                                     "weight_decay": decay})
            group["params"].append(param)
            blocks[block][0] += 1
            blocks[block][1] += math.prod(block_state_shape(tuple(param.shape), block=block, num_heads=heads))
            no_decay += key in ("biases", "norms")
    groups = list(by_key.values())
    check_coverage(model, groups, "adam_mini.partition", log=logger)
    logger.info("adam_mini.partition: %s; %d tensors (norms, biases) without weight decay", ", ".join(
        f"{kind} {tensors} tensors ({count} blocks)" for kind, (tensors, count) in blocks.items()), no_decay)
    return groups


def _heads(config, role: str, name: str, shape: tuple[int, ...]) -> int:
    """Heads of a q_proj/k_proj weight from the model's config; ValueError when its rows disagree."""
    if config is None or getattr(config, "num_attention_heads", None) is None:
        raise ValueError(f"adam_mini: {name} needs the model's config.num_attention_heads to split it into heads")
    heads = getattr(config, _HEAD_ROLES[role], None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if shape[0] != heads * head_dim:
        raise ValueError(f"adam_mini: {name} has {shape[0]} rows, not {_HEAD_ROLES[role]} x head_dim = "
                         f"{heads} x {head_dim} = {heads * head_dim} (model config)")
    return heads


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> AdamMini:
    """Adam-mini over `model` (`partition`), with AdamW's lr/betas/eps/decay semantics.

    options (None means the default): betas (0.9, 0.999), eps 1e-8, state_dtype (None: the gradient's
    dtype; "float32": float32 moments for bf16 weights).
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'adam_mini' does not take option(s) {', '.join(unknown)}")
    options = {key: value for key, value in options.items() if value is not None}
    return AdamMini(partition(model, weight_decay), lr=lr, weight_decay=weight_decay, **options)


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """One weight's state after a step (s bytes a state number): step (8) + m (s n) + v, one number per block
    (`block_state_shape`: n elementwise, m rows, its heads, 1 for the whole tensor)."""
    blocks = math.prod(block_state_shape(tuple(param.shape), block=group["block"], num_heads=group["num_heads"]))
    return NUMBER_BYTES + state_element_size(group, param) * (param.numel() + blocks)


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"lr": 0.005},
    "130m": {"lr": 0.005},
    "350m": {"lr": 0.005},
    "1b": {"lr": 0.005},
}
SPEC = OptimizerSpec("adam_mini", build, OPTIONS, "Adam-mini: one second moment per block (head, row, token, tensor)",
                     default_eps=1e-8, from_groups=AdamMini, state_bytes=param_state_bytes,
                     scratch_bytes=scratch.adam_mini, smoke_lr=3e-3, smoke_flags={"lr": 0.003},
                     recipes=RECIPES, published={ADAM_MINI_PAPER_67M: 29.01})
