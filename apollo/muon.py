r"""Muon for the hidden matrices and AdamW for the rest, presented to the training loop as one optimizer.

    optimizer = apollo.muon.build(model, lr=0.02, weight_decay=0.1, adam_lr=3e-3)

The update itself is torch's: `torch.optim.Muon` (torch >= 2.9) for the 2-D weights of the
``nn.Linear`` modules inside the decoder layers (LLaMA: q/k/v/o_proj, gate/up/down_proj) and
`torch.optim.AdamW` for everything else (input embedding, lm_head, norms, biases). `MuonAdamW`
holds one of each, built over the *same* param-group dicts and sharing the *same* ``state`` mapping,
so that its own ``param_groups``, ``state``, ``state_dict()``/``load_state_dict()``,
`apollo.optimizer_state_bytes`, `torch.distributed.checkpoint.state_dict.get_state_dict` and the
loop's per-group lr schedule see one ordinary torch optimizer. Only row-sharded (FSDP2 DTensor)
Muon weights take a step of ours (`sharded_muon_update`): Newton-Schulz needs the whole matrix.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from . import scratch
from .spec import SCALE_RUNS_60M, Flag, OptimizerSpec
from .factory import torch_adamw_state_bytes
from .scale import ADAM_LR
from . import quant, sharded
from .base import BaseOptimizer, check_hyperparameters
from .routing import check_coverage, trainable

logger = logging.getLogger(__name__)

KINDS = ("muon", "adamw")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: torch.optim.Muon's defaults (Keller Jordan's Newton-Schulz coefficients and epsilon).
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_EPS = 1e-7

#: `build`'s options, each with a default (None = the default named in `build`'s docstring).
OPTIONS = frozenset({"momentum", "nesterov", "adjust_lr_fn", "ns_steps", "adam_lr", "adam_weight_decay",
                     "betas", "eps", "state_dtype"})


def _torch_muon():
    """torch.optim.Muon and its Newton-Schulz / lr-adjustment helpers (torch >= 2.9)."""
    try:
        from torch.optim import Muon
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
    except ImportError as error:  # pragma: no cover - torch < 2.9
        raise ImportError(f"muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}") from error
    return Muon, _zeropower_via_newtonschulz, _adjust_lr


class MuonAdamW(BaseOptimizer):
    r"""torch.optim.Muon over the ``kind="muon"`` groups, torch.optim.AdamW over the ``kind="adamw"`` groups.

    Muon (torch's definition; :math:`G` the gradient of an m x n weight :math:`W`, :math:`\mu` momentum,
    :math:`\eta` lr, :math:`\lambda` weight decay):

    .. math::
        B &\leftarrow \mu B + (1-\mu) G \qquad (\texttt{B.lerp\_(G, 1-\mu)}) \\
        U &= (1-\mu) G + \mu B \ \text{(nesterov)}, \quad U = B \ \text{otherwise} \\
        X_0 &= U / \max(\lVert U\rVert_F, \epsilon) \ \text{in bfloat16, transposed when } m > n \\
        X_{k+1} &= a X_k + (b A_k + c A_k^2) X_k, \quad A_k = X_k X_k^\top, \quad k < \text{ns\_steps} \\
        W &\leftarrow (1 - \eta\lambda) W - \eta s\, O, \quad O = X_{\text{ns\_steps}}
            \ (\text{transposed back})

    with :math:`(a, b, c) = (3.4445, -4.775, 2.0315)`, :math:`\epsilon = 10^{-7}` and
    :math:`s = \sqrt{\max(1, m/n)}` (``adjust_lr_fn="original"``, torch's default, used for ``None``)
    or :math:`s = 0.2\sqrt{\max(m, n)}` (``"match_rms_adamw"``: the update's RMS matches AdamW's, so
    AdamW's lr and decay can be reused). The decay uses the unadjusted :math:`\eta`. The iteration
    maps every singular value :math:`\sigma` of :math:`X_0` through the quintic
    :math:`p(x) = ax + bx^3 + cx^5` five times: roughly :math:`U V^\top` of the SVD, with singular
    values spread around 1 rather than equal to it.

    AdamW (torch's, for embeddings, lm_head, norms): :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`, :math:`\theta \leftarrow (1-\eta\lambda)\theta
    - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)` with bias corrections (eps default 1e-8).

    State per m x n Muon weight: ``momentum_buffer`` (m n numbers in the gradient's dtype, no step
    counter). Per AdamW tensor of n numbers: ``exp_avg``, ``exp_avg_sq`` (2 n in the parameter's
    dtype) and ``step`` (a 0-d float32 tensor: 4 bytes). torch keeps both states in the parameter's
    dtype: float32 moments for bfloat16 weights are not possible (`build` refuses
    ``state_dtype="float32"`` there).

    Param groups: each carries ``kind`` ("muon" or "adamw") and every hyper-parameter of its torch
    optimizer (a Muon group: lr, weight_decay, momentum, nesterov, ns_coefficients, eps (Newton-Schulz
    epsilon), ns_steps, adjust_lr_fn; an AdamW group: lr, betas, eps, weight_decay and torch's flags),
    so ``type(opt)([dict(group, params=[p])])`` rebuilds one parameter's optimizer. Keys a group does
    not set come from the constructor arguments (``adam_lr``/``adam_weight_decay``/``betas``/``eps``
    for AdamW groups; ``None`` = Muon's lr / weight decay).

    Sharded weights (FSDP2 DTensors, ``Shard(0)`` on a 1-D mesh): AdamW is elementwise and torch runs
    it on DTensors as they are. Muon gathers each matrix's U (``full_tensor()``, one all-gather of
    m n numbers per matrix, not bucketed), orthogonalises it with torch's own Newton-Schulz function
    on every rank, and keeps this rank's rows; the momentum buffer stays a ``Shard(0)`` DTensor
    (1/world of it per rank). Every step of that path equals the unsharded one to the bit.

    Differences from the published Muon recipes (Keller Jordan's, Moonshot's): none in the Muon math
    (it is torch's); routing is by module (decoder-layer ``nn.Linear`` weights) rather than by
    ``ndim == 2``, so the embedding and lm_head always go to AdamW; the AdamW part decays every tensor
    it holds (norms included), as the harness's AdamW does.
    """

    #: torch's load: the states follow the weights' dtype anyway, and AdamW's step counter stays where torch puts it
    keep_saved_dtypes = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        adam_lr: float | None = None,
        adam_weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self._kind_defaults = {
            "muon": dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_coefficients=tuple(ns_coefficients), eps=ns_eps, ns_steps=ns_steps,
                         adjust_lr_fn=adjust_lr_fn),
            "adamw": dict(lr=lr if adam_lr is None else adam_lr, betas=tuple(betas), eps=eps,
                          weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay),
        }
        for kind, values in self._kind_defaults.items():
            _validate_group(values, kind, f"{kind} defaults")
        self._inner: dict[str, Optimizer] = {}
        super().__init__(params, {})

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a ``kind="muon"`` or ``kind="adamw"`` group to this optimizer and to the inner one of its kind."""
        kind = param_group.get("kind")
        if kind not in KINDS:
            name = self._group_name(param_group, len(self.param_groups))
            raise ValueError(f"MuonAdamW: {name} needs kind='muon' or kind='adamw', got {kind!r}")
        for key, value in self._kind_defaults[kind].items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)  # checked by _check_group
        group = self.param_groups[-1]  # the same dict
        inner = self._inner.get(kind)
        if inner is None:
            self._inner[kind] = self._new_inner(kind, group)
        else:
            inner.add_param_group(group)

    def _check_group(self, group: dict[str, Any], name: str) -> None:
        _validate_group(group, group["kind"], name)
        if group["kind"] != "muon":
            return
        for param in group["params"]:
            if param.dim() != 2:
                raise ValueError(f"MuonAdamW: {name} (Muon) takes 2-D weights only, got shape {tuple(param.shape)}")
            if param.dtype == torch.bfloat16 and not group["nesterov"]:
                raise ValueError(f"MuonAdamW: {name}: torch.optim.Muon with nesterov=False divides the momentum "
                                 "buffer of a bfloat16 weight by its norm in place (torch bug); use nesterov=True")

    def _new_inner(self, kind: str, group: dict[str, Any]) -> Optimizer:
        """torch's optimizer of `kind` over `group` itself (not a copy), sharing this optimizer's state."""
        defaults = {key: group[key] for key in self._kind_defaults[kind]}
        if kind == "muon":
            muon_class, _, _ = _torch_muon()
            inner = muon_class([group], **defaults)
        else:
            inner = torch.optim.AdamW([group], **defaults)
        inner.state = self.state
        return inner

    def _rewire(self) -> None:
        """Point the inner optimizers at this optimizer's current group dicts and state mapping."""
        for kind, inner in self._inner.items():
            inner.param_groups = [group for group in self.param_groups if group["kind"] == kind]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load (floating state cast to the parameter's dtype), then the inner optimizers follow."""
        saved = [group.get("kind") for group in state_dict["param_groups"]]
        current = [group["kind"] for group in self.param_groups]
        if saved != current:
            raise ValueError(f"MuonAdamW: the state dict's group kinds {saved} do not match this optimizer's {current}")
        super().load_state_dict(state_dict)
        self._rewire()

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps defaults, state and param_groups only; a copy or pickle needs the inner optimizers too
        return {**super().__getstate__(), "_inner": self._inner, "_kind_defaults": self._kind_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_inner" in self.__dict__:  # a copy or unpickled optimizer, or load_state_dict (which rewires after)
            self._rewire()

    # ------------------------------------------------------------------- step
    def _step_parameters(self) -> None:
        """One update: torch's Muon step (ours for sharded weights), then torch's AdamW step."""
        muon = self._inner.get("muon")
        if muon is not None:
            if any(sharded.is_dtensor(p) for group in muon.param_groups for p in group["params"]):
                self._sharded_muon_step(muon.param_groups)
            else:
                muon.step()
        adamw = self._inner.get("adamw")
        if adamw is not None:
            adamw.step()

    def _sharded_muon_step(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:  # as torch does: zeros like the gradient (a DTensor stays one)
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                sharded_muon_update(
                    param, param.grad, state["momentum_buffer"], lr=lr, weight_decay=group["weight_decay"],
                    momentum=group["momentum"], nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
                    ns_steps=group["ns_steps"], eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"],
                )


def _validate_group(group: dict[str, Any], kind: str, name: str) -> None:
    """Precise ValueErrors for the hyper-parameters of a Muon or AdamW group."""
    where = f"MuonAdamW: {name}"
    if kind == "adamw":
        check_hyperparameters(group, where, keys=("lr", "weight_decay", "betas", "eps"))
        return
    check_hyperparameters(group, where, keys=("lr", "weight_decay"))

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {key} must be {rule}, got {group[key]!r}")

    check(isinstance(group["momentum"], (int, float)) and 0 <= group["momentum"] < 1, "momentum", "in [0, 1)")
    check(isinstance(group["nesterov"], bool), "nesterov", "True or False")
    check(isinstance(group["ns_steps"], int) and not isinstance(group["ns_steps"], bool)
          and 1 <= group["ns_steps"] < 100, "ns_steps", "an integer in [1, 100)")
    check(group["adjust_lr_fn"] in ADJUST_LR_FNS, "adjust_lr_fn", "None, 'original' or 'match_rms_adamw'")
    check(len(tuple(group["ns_coefficients"])) == 3, "ns_coefficients", "three numbers (a, b, c)")
    check(isinstance(group["eps"], (int, float)) and group["eps"] > 0, "eps", "> 0 (Newton-Schulz)")


def sharded_muon_update(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, *, lr: float, weight_decay: float,
    momentum: float, nesterov: bool, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
    adjust_lr_fn: str | None,
) -> None:
    """torch.optim.Muon's update of one weight whose rows may be sharded (a ``Shard(0)`` DTensor), in place.

    Momentum and decay are row-local; only U is gathered (m n numbers), orthogonalised whole by
    torch's Newton-Schulz function, and this rank's rows of it applied. A plain tensor is its own
    whole matrix. The operations are torch's, in torch's order: the result equals the unsharded step.
    """
    _, zeropower, adjust_lr = _torch_muon()
    shard = sharded.row_shard(param)
    buf = sharded.local(momentum_buffer)
    g = sharded.local(grad)
    w = sharded.local(param)
    buf.lerp_(g, 1 - momentum)
    update = g.lerp(buf, momentum) if nesterov else buf
    if shard is not None:  # the whole U on every rank
        from torch.distributed.tensor import DTensor

        update = DTensor.from_local(update, shard.mesh, shard.placements, run_check=False, shape=param.shape,
                                    stride=param.stride()).full_tensor()
    ortho = zeropower(update, ns_coefficients, ns_steps, eps)
    if shard is not None:
        ortho = shard.rows_of(ortho)
    w.mul_(1 - lr * weight_decay)
    w.add_(ortho, alpha=-adjust_lr(lr, adjust_lr_fn, param.shape))


# --------------------------------------------------------------------------------------- routing
def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon weights, AdamW parameters) of a transformers causal LM; the one place that routes.

    Muon: the 2-D ``weight`` of every ``nn.Linear`` inside the decoder layers
    (``model.get_decoder().layers``, as many as ``config.num_hidden_layers``), except the input
    embedding (``get_input_embeddings()``) and output head (``get_output_embeddings()``) weights,
    even when tied. AdamW: every other trainable parameter. Frozen parameters are left out.
    """
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"muon routes the decoder layers of a transformers model (get_decoder().layers); "
                         f"{type(model).__name__} has none")
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and len(layers) != expected:
        raise ValueError(f"muon: get_decoder().layers has {len(layers)} modules, config.num_hidden_layers is {expected}")
    embeddings = [getter() for getter in (getattr(model, "get_input_embeddings", None),
                                          getattr(model, "get_output_embeddings", None)) if callable(getter)]
    excluded = {id(module.weight) for module in embeddings if module is not None}
    muon: list[nn.Parameter] = []
    muon_ids: set[int] = set()
    for layer in layers:
        for module in layer.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and trainable(weight) and weight.dim() == 2
                    and id(weight) not in excluded and id(weight) not in muon_ids):
                muon_ids.add(id(weight))
                muon.append(weight)
    adamw = [p for p in model.parameters() if trainable(p) and id(p) not in muon_ids]
    check_coverage(model, [{"params": muon}, {"params": adamw}], "muon param_groups", log=None)  # logged below
    logger.info("muon param_groups: %d Muon matrices (%.2fM values), %d AdamW tensors (%.2fM values)",
                len(muon), sum(p.numel() for p in muon) / 1e6, len(adamw), sum(p.numel() for p in adamw) / 1e6)
    return muon, adamw


_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> MuonAdamW:
    """`MuonAdamW` over `model`: Muon for the decoder-layer matrices, AdamW for the rest (`param_groups`).

    Options (None = the default): ``momentum`` 0.95, ``nesterov`` True, ``adjust_lr_fn`` None
    (torch's default, "original"; or "match_rms_adamw"), ``ns_steps`` 5; for the AdamW part
    ``adam_lr`` (default `lr`), ``adam_weight_decay`` (default `weight_decay`), ``betas``
    (0.9, 0.999), ``eps`` 1e-8; ``state_dtype`` None (torch keeps every state in the parameter's
    dtype; a dtype other than the weights' is refused). `weight_decay` applies to both parts.
    Refused: int8 weights (--weight_quant): Muon orthogonalises the float gradient of a float weight.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'muon' does not take option(s) {', '.join(unknown)}")
    options = {key: value for key, value in options.items() if value is not None}
    if any(quant.is_quantized(p) for p in model.parameters()):
        raise ValueError("muon cannot update int8 weights (--weight_quant): torch.optim.Muon needs float weights")
    state_dtype = options.pop("state_dtype", None)
    if state_dtype is not None:
        dtype = state_dtype if isinstance(state_dtype, torch.dtype) else _STATE_DTYPES.get(state_dtype)
        if dtype is None:
            raise ValueError(f"muon: state_dtype must be None, a torch.dtype or one of {sorted(_STATE_DTYPES)}, "
                             f"got {state_dtype!r}")
        other = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype != dtype})
        if other:
            raise ValueError(f"muon: torch.optim.Muon/AdamW keep their state in the weights' dtype ({', '.join(other)}), "
                             f"so state_dtype={str(dtype).removeprefix('torch.')} is impossible; use state_dtype None")
    muon, adamw = param_groups(model)
    groups = [{"params": muon, "kind": "muon", "name": "muon"},
              {"params": adamw, "kind": "adamw", "name": "adamw"}]
    return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, **options)


MUON_MOMENTUM = Flag("muon_momentum", float, "Muon: momentum (default 0.95)", "momentum", low=0.0, below=1.0)
MUON_NO_NESTEROV = Flag("muon_no_nesterov", bool, "Muon: plain momentum instead of Nesterov's", "nesterov",
                        default=False, negated=True)  # the flag turns Nesterov off: the option is its negation
MUON_ADJUST_LR = Flag("muon_adjust_lr", str, "Muon: lr adjustment to the matrix shape (default original)",
                      "adjust_lr_fn", choices=("original", "match_rms_adamw"))


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """One weight's state after a step, in the weight's dtype (p bytes, n numbers): a Muon matrix its momentum
    buffer p n; the AdamW part torch.optim.AdamW's 4 + 2 p n."""
    if group["kind"] == "muon":
        return param.element_size() * param.numel()
    return torch_adamw_state_bytes(param, group)


#: Its published recipes' settings by model size (see OptimizerSpec.recipes).
RECIPES = {
    "60m": {"lr": 0.016, "adam_lr": 0.0032, "muon_momentum": 0.95, "weight_decay": 0.1},
    "130m": {"lr": 0.012, "adam_lr": 0.0024, "muon_momentum": 0.95, "weight_decay": 0.1},
    "350m": {"lr": 0.008, "adam_lr": 0.0016, "muon_momentum": 0.95, "weight_decay": 0.1},
    "1b": {"lr": 0.004, "adam_lr": 0.0012, "muon_momentum": 0.95, "weight_decay": 0.1},
}
SPEC = OptimizerSpec(
    "muon", build, OPTIONS,
    "torch.optim.Muon on the decoder matrices + torch.optim.AdamW on embeddings, lm_head, norms",
    cli_flags=(ADAM_LR, MUON_MOMENTUM, MUON_NO_NESTEROV, MUON_ADJUST_LR), default_eps=1e-8,
    flag_help={"adam_lr": "embeddings, lm_head and norms, default --lr"},
    from_groups=MuonAdamW, state_bytes=param_state_bytes, scratch_bytes=scratch.muon,
    torch_adamw_groups=lambda group: (group or {}).get("kind") != "muon",  # embeddings, lm_head, norms
    states_follow_weights=True,  # torch's Muon and AdamW keep their states in the weights' dtype
    refuses={"weight_quant": "Newton-Schulz on re-quantised int8 weights is not a published method"},
    smoke_lr=0.02, smoke_options={"adam_lr": 3e-3}, smoke_flags={"lr": 0.02, "adam_lr": 0.003},
    published={SCALE_RUNS_60M: 28.86},
    recipes=RECIPES,
)
