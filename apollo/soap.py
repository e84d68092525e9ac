r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (arXiv 2409.11321), from PEERS.md's math.

`SOAP` is the optimizer; `build(model, lr, weight_decay, **options)` routes a model's parameters into it
(every 2-D weight rotated, everything else plain Adam). The math is in the pure functions below
(`eigenbasis`, `refresh_basis`, `rotate`, `unrotate`, `soap_matrix_step`); `SOAP.step` does the bookkeeping.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from . import scratch
from .spec import Flag, OptimizerSpec
from . import functional as F
from . import quant, sharded
from .base import BaseOptimizer, check_hyperparameters
from .routing import check_coverage, trainable
from .state_dtypes import NUMBER_BYTES, STATE_DTYPES as ALL_STATE_DTYPES, state_dtype_name, state_element_size

logger = logging.getLogger(__name__)

#: The option keys `build` accepts (every one has a default in `SOAP.__init__`).
OPTIONS = frozenset({"betas", "eps", "shampoo_beta", "precondition_frequency", "max_precond_dim", "state_dtype"})

def _state_dtype_name(state_dtype: torch.dtype | str | None) -> str | None:
    return state_dtype_name(state_dtype, who="SOAP")


#: Added to the diagonal before eigh (the published guard): shifts exactly-zero eigenvalues off zero.
EIGH_DIAGONAL_SHIFT = 1e-30


def _decompose_robustly(decompose, mat: torch.Tensor):
    """`decompose(mat)` in mat's dtype, retried in float64 when LAPACK/cuSOLVER fails to converge or the
    result is not finite (rank-deficient statistics: the rows of tokens absent from a batch give many
    repeated zero eigenvalues). Returns the result cast back to mat's dtype, or None if both attempts fail."""
    for dtype in dict.fromkeys((mat.dtype, torch.float64)):
        try:
            result = decompose(mat.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if all(torch.isfinite(part).all() for part in result):
            return tuple(part.to(mat.dtype) if part.is_floating_point() else part for part in result)
    return None


def eigenbasis(mat: torch.Tensor) -> torch.Tensor | None:
    """Eigenvectors of the symmetric `mat` as columns, in descending order of eigenvalue
    (``torch.linalg.eigh``'s ascending order reversed) of mat + 1e-30 I; retried in float64 when eigh
    fails; None when that fails too (the caller keeps the previous basis). On the meta device: an empty
    matrix of the shape."""
    if mat.device.type == "meta":
        return torch.empty_like(mat)
    shift = EIGH_DIAGONAL_SHIFT * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    result = _decompose_robustly(lambda m: (torch.linalg.eigh(m).eigenvectors.flip(-1),), mat + shift)
    return None if result is None else result[0]


def refresh_basis(mat: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One power-iteration step with QR: returns (Q', order), or None when the QR fails in the working
    dtype and in float64 or gives non-finite numbers (the caller keeps Q and the order of v).

    e = diag(Qᵀ L Q); order = argsort(e, descending, stable); Q' = qr(L · Q[:, order]).Q.
    `order` is what the second moment is permuted by. On the meta device: (basis, identity order).
    """
    if mat.device.type == "meta":
        return basis, torch.arange(basis.shape[1], device=basis.device)
    product = mat @ basis                                  # L Q, (k, k)
    estimate = (basis * product).sum(dim=0)                # diag(Qᵀ L Q)
    order = torch.argsort(estimate, descending=True, stable=True)
    result = _decompose_robustly(lambda m: (torch.linalg.qr(m).Q,), product[:, order])  # L (Q[:, order]) = (L Q)[:, order]
    return None if result is None else (result[0], order)


def rotate(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """Q_Lᵀ x Q_R (None: that side is the identity)."""
    if left is not None:
        x = left.T @ x
    if right is not None:
        x = x @ right
    return x


def unrotate(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """Q_L x Q_Rᵀ (None: that side is the identity)."""
    if left is not None:
        x = left @ x
    if right is not None:
        x = x @ right.T
    return x


def accumulate_statistics(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, *,
                          shampoo_beta: float) -> None:
    """L <- lerp(L, G Gᵀ, 1 - beta_s), R <- lerp(R, Gᵀ G, 1 - beta_s), in place (None: side not kept)."""
    if left is not None:
        left.lerp_(grad @ grad.T, 1.0 - shampoo_beta)
    if right is not None:
        right.lerp_(grad.T @ grad, 1.0 - shampoo_beta)


def soap_matrix_step(
    weight: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    left_basis: torch.Tensor | None,
    right_basis: torch.Tensor | None,
    *,
    step: int,
    refresh: bool,
    lr: float,
    beta1: float,
    beta2: float,
    shampoo_beta: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One SOAP update of a 2-D `weight` (t = `step` >= 1 Adam steps), in this order:

    1. G' = Q_Lᵀ G Q_R; m <- beta1 m + (1 - beta1) G'; v <- beta2 v + (1 - beta2) G'²   (old basis)
    2. W <- W - lr c_t Q_L (m / (sqrt(v) + eps)) Q_Rᵀ, c_t = sqrt(1 - beta2^t) / (1 - beta1^t); W <- W - lr wd W
    3. L, R <- lerp(., G Gᵀ / Gᵀ G, 1 - shampoo_beta)
    4. if `refresh`: (Q, order) <- refresh_basis(L, Q) per kept side; v <- v[order_L][:, order_R];
       m <- Q_L'ᵀ (Q_L m Q_Rᵀ) Q_R' (m rotated exactly from the old basis into the new one). A side whose
       QR fails (in its dtype and in float64) keeps its basis and v's order.

    All tensors share one floating dtype (the caller casts). Moments, L, R are updated in place;
    returns the (possibly new) bases.
    """
    rotated = rotate(grad, left_basis, right_basis)                    # G', (m, n)
    exp_avg.mul_(beta1).add_(rotated, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
    del rotated
    direction = exp_avg / exp_avg_sq.sqrt().add_(eps)                  # in the rotated basis
    direction = unrotate(direction, left_basis, right_basis)
    weight.add_(direction.to(weight.dtype), alpha=-F.bias_corrected_step_size(lr, beta1, beta2, step))
    del direction
    F.decay_weights(weight, lr, weight_decay)

    accumulate_statistics(grad, left, right, shampoo_beta=shampoo_beta)
    if not refresh:
        return left_basis, right_basis
    moment = unrotate(exp_avg, left_basis, right_basis)                # m in the weight's basis
    new_left, new_right = left_basis, right_basis
    if left is not None and (refreshed := refresh_basis(left, left_basis)) is not None:
        new_left, order = refreshed
        exp_avg_sq.copy_(exp_avg_sq[order, :])
    if right is not None and (refreshed := refresh_basis(right, right_basis)) is not None:
        new_right, order = refreshed
        exp_avg_sq.copy_(exp_avg_sq[:, order])
    exp_avg.copy_(rotate(moment, new_left, new_right))
    return new_left, new_right


# ------------------------------------------------------------------------------------ the optimizer
class SOAP(BaseOptimizer):
    r"""SOAP (arXiv 2409.11321): Adam run in the eigenbasis of Shampoo's two-sided preconditioner.

    For a 2-D weight :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G`. A side longer than
    ``max_precond_dim`` (default 10000, e.g. the vocabulary side of embed_tokens / lm_head) is not
    rotated: its Q is the identity and neither its statistics nor its Q is stored. Call ``k`` counts
    the calls of `step` that saw a gradient for the parameter (``state["step"]``); ``t = k - 1`` counts
    Adam steps.

    **Call k = 1 (initialisation only).** :math:`L = (1-\beta_s) G G^\top`, :math:`R = (1-\beta_s) G^\top G`
    (lerp from zero), :math:`Q_L, Q_R` = their eigenvectors (``torch.linalg.eigh``, columns in descending
    order of eigenvalue), m = v = 0. **No moment update, no weight update, no weight decay.** This holds
    for every parameter, 1-D ones included (their first call only creates zero moments).

    **Call k >= 2 (t = k - 1)**, in this order:

    .. math::
        G' &= Q_L^\top G Q_R \quad (\text{the current basis})\\
        m &\leftarrow \beta_1 m + (1-\beta_1) G', \quad v \leftarrow \beta_2 v + (1-\beta_2) G'^{\odot 2}\\
        W &\leftarrow W - \eta\, \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, Q_L \big(m / (\sqrt v + \epsilon)\big) Q_R^\top,
        \quad W \leftarrow W - \eta \lambda W\\
        L &\leftarrow \beta_s L + (1-\beta_s) G G^\top, \quad R \leftarrow \beta_s R + (1-\beta_s) G^\top G

    then, **if t % f == 0** (f = ``precondition_frequency``; after Adam steps f, 2f, ...), the basis is
    refreshed *after* this step's moment and weight update, from the L, R that include this G:
    per kept side, :math:`e = \mathrm{diag}(Q^\top L Q)`, ``order = argsort(e, descending, stable)``,
    :math:`Q' = \mathrm{qr}(L\, Q_{[:, order]}).Q` (one power-iteration step); v is permuted to match
    (``v[order_L][:, order_R]``, no rotation); m is rotated exactly into the new basis,
    :math:`m \leftarrow Q_L'^\top (Q_L m Q_R^\top) Q_R'`. The next step's G' uses Q'.

    **1-D parameters** (norms, biases) and parameters of any dimension other than 2: this repository's
    AdamW (``functional.adamw_update``: m, v on G, the same :math:`c_t` with t = k - 1, ε on the
    uncorrected √v, decay after the update). A 2-D weight with both sides over ``max_precond_dim`` gets
    the same update through the rotated path with identity bases.

    State per m x n weight (both sides rotated): ``exp_avg``, ``exp_avg_sq`` (m x n each, in the rotated
    basis), ``L``, ``Q_L`` (m x m), ``R``, ``Q_R`` (n x n), ``step`` (int): **2mn + 2m² + 2n²** numbers
    (a side over ``max_precond_dim`` drops its two square terms) in the state dtype, plus 8 bytes.
    1-D: ``exp_avg``, ``exp_avg_sq``, ``step``.

    Hyper-parameters (all live in every param group, so a group rebuilds the optimizer on its own):
    ``lr`` (3e-3), ``betas`` ((0.95, 0.95)), ``eps`` (1e-8), ``weight_decay`` (0.01, the published value;
    `build` defaults to 0.0 like the harness's other optimizers), ``shampoo_beta`` (None = beta2),
    ``precondition_frequency`` (10), ``max_precond_dim`` (10000), ``state_dtype`` (None = the parameter's
    dtype; "float32" keeps all state, L/R/Q included, in float32 for bf16 weights). The arithmetic of a
    matrix runs in the state dtype promoted to at least float32 (eigh/QR have no bf16 kernels); a
    float64 weight runs in float64.

    Deliberate choices where PEERS.md leaves room, or differences from the published code:

    - the first call initialises every parameter and updates none (PEERS.md: "the first step only
      initialises L, R, Q"); Adam's bias correction counts from the second call;
    - ε is added to the uncorrected √v with the bias correction folded into the step size (this
      repository's AdamW convention); decay is applied after the update with the plain lr;
    - the refresh is ordered after the moment/weight update of the same step (stated above), sorts by
      diag(QᵀLQ) with a stable descending argsort, and takes torch.linalg.qr's Q as is (no sign fixing:
      the update does not depend on the signs of Q's columns, m being rotated exactly);
    - no gradient normalisation, no merging of dimensions, no preconditioning of 1-D parameters;
    - eigh runs on L + 1e-30 I and is retried in float64 when it fails to converge (as published); a QR
      refresh is retried the same way; a side whose decomposition fails in float64 too keeps its
      previous basis (the identity at the first call) and v's order, with one warning per optimizer
      (the published code would raise);
    - sharded (DTensor / ``--fsdp``) and int8 (``--weight_quant``) weights are refused.

    A property of the method worth knowing: for m > n, L = (1-β_s) G Gᵀ at the first call has rank <= n, so
    its eigenbasis is arbitrary on the (m - n)-dimensional null space (whatever eigh returns). It is
    deterministic for identical inputs, but gradients that differ by rounding (bf16 against float32) pick
    different bases there, and the runs then differ by more than rounding (the same holds for R, n > m).
    """

    group_label = "SOAP"

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        shampoo_beta: float | None = None,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        state_dtype: torch.dtype | str | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        state_dtype=_state_dtype_name(state_dtype))
        super().__init__(params, defaults)

    # --------------------------------------------------------------------------------- groups
    def _check_group(self, group: dict[str, Any], name: str) -> None:
        group["betas"] = tuple(group["betas"])
        group["state_dtype"] = _state_dtype_name(group["state_dtype"])
        _validate_group(group, name)
        for param in group["params"]:
            if sharded.is_dtensor(param):
                raise ValueError("--fsdp is not supported for soap: the preconditioners need the whole matrix "
                                 "(sharded DTensor parameter)")
            if quant.is_quantized(param):
                raise ValueError("soap cannot update int8 weights (--weight_quant): it has no int8 weight path")

    # ---------------------------------------------------------------------------------- state
    @staticmethod
    def _dtypes(group: dict[str, Any], param: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """(state dtype, compute dtype): the state dtype promoted to at least float32."""
        state_dtype = ALL_STATE_DTYPES[group["state_dtype"]] or param.dtype
        return state_dtype, torch.promote_types(state_dtype, torch.float32)

    @staticmethod
    def rotated_sides(shape: torch.Size | tuple[int, ...], max_precond_dim: int) -> tuple[bool, bool]:
        """(left rotated, right rotated) for a 2-D shape: a side is rotated when its length <= max_precond_dim."""
        rows, cols = shape
        return rows <= max_precond_dim, cols <= max_precond_dim

    def _init_state(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        state_dtype, work = self._dtypes(group, param)
        state["step"] = 0
        state["exp_avg"] = torch.zeros(param.shape, dtype=state_dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=state_dtype, device=param.device)
        if param.dim() != 2:
            return
        beta_s = _shampoo_beta(group)
        g = grad.to(work)
        for side, keep, size in zip(("L", "R"), self.rotated_sides(param.shape, group["max_precond_dim"]), param.shape):
            if not keep:
                continue
            stat = torch.zeros(size, size, dtype=work, device=param.device)
            stat.lerp_(g @ g.T if side == "L" else g.T @ g, 1.0 - beta_s)   # from zero: (1 - beta_s) G Gᵀ
            state[side] = stat.to(state_dtype)
            basis = eigenbasis(stat)
            if basis is None:  # eigh failed in float64 too: start unrotated on this side
                self._warn_linalg_failure(f"eigh of the {size}x{size} {side} statistics", "the identity")
                basis = torch.eye(size, dtype=work, device=param.device)
            state[f"Q_{side}"] = basis.to(state_dtype)

    def _warn_linalg_failure(self, what: str, kept: str) -> None:
        """Say once per optimizer that a decomposition failed and what basis is used instead."""
        if not getattr(self, "_linalg_failure_reported", False):
            self._linalg_failure_reported = True
            logger.warning("SOAP: %s failed in float32 and float64; that side keeps %s (said once)", what, kept)

    # ----------------------------------------------------------------------------------- step
    def _step_parameters(self) -> None:
        """One SOAP step for every parameter with a gradient (see the class docstring for the order)."""
        for group in self.param_groups:
            for param in group["params"]:
                grad = self._gradient(param)  # int8 weights are refused: this is param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, grad, group)
                state["step"] += 1
                if state["step"] == 1:
                    continue  # the first call only initialises L, R, Q (and zero moments)
                if param.dim() == 2:
                    self._step_matrix(param, grad, group, state)
                else:
                    beta1, beta2 = group["betas"]
                    F.adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"] - 1,
                                   lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                   weight_decay=group["weight_decay"])

    def _step_matrix(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state_dtype, work = self._dtypes(group, param)
        keys = ("exp_avg", "exp_avg_sq", "L", "R", "Q_L", "Q_R")
        tensors = {key: state[key].to(work) if key in state else None for key in keys}  # no copy when work == state dtype
        adam_step = state["step"] - 1
        beta1, beta2 = group["betas"]
        refresh = adam_step % group["precondition_frequency"] == 0
        new_left, new_right = soap_matrix_step(
            param, grad.to(work), tensors["exp_avg"], tensors["exp_avg_sq"], tensors["L"], tensors["R"],
            tensors["Q_L"], tensors["Q_R"], step=adam_step, refresh=refresh,
            lr=group["lr"], beta1=beta1, beta2=beta2, shampoo_beta=_shampoo_beta(group), eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        for side, new_basis in (("L", new_left), ("R", new_right)):
            if refresh and tensors[side] is not None and new_basis is tensors[f"Q_{side}"]:
                self._warn_linalg_failure(f"the QR refresh of the {side} basis of a {tuple(param.shape)} weight",
                                          "its previous basis")
        tensors["Q_L"], tensors["Q_R"] = new_left, new_right
        for key, value in tensors.items():
            if value is not None and value is not state[key]:
                state[key].copy_(value)  # back into the state dtype (or the new basis into the old storage)


def _shampoo_beta(group: dict[str, Any]) -> float:
    return group["betas"][1] if group["shampoo_beta"] is None else group["shampoo_beta"]


def _validate_group(group: dict[str, Any], name: str) -> None:
    """ValueError (one line naming the key) for any bad hyper-parameter of a SOAP param group."""
    check_hyperparameters(group, name)
    beta_s = group["shampoo_beta"]
    if beta_s is not None and not 0.0 <= beta_s < 1.0:
        raise ValueError(f"{name}: shampoo_beta must be None (use beta2) or in [0, 1), got {beta_s!r}")
    for key, low in (("precondition_frequency", 1), ("max_precond_dim", 0)):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {key} must be an integer >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------------- routing
def build(model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> SOAP:
    """SOAP over `model`: every trainable 2-D parameter in the "rotated" group (a side longer than
    ``max_precond_dim`` stays unrotated: the vocabulary side of embed_tokens / lm_head at the default
    10000), every other trainable parameter (RMSNorm weights, biases) in the "adam" group.

    options (see `OPTIONS`; None means the default): betas (0.95, 0.95), eps 1e-8, shampoo_beta
    (None = beta2), precondition_frequency 10, max_precond_dim 10000, state_dtype (None). The published
    weight decay is 0.01; `build` takes what the caller passes (default 0.0, like the other optimizers).
    Refuses int8 and sharded (DTensor) weights with one-line ValueErrors.
    """
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"optimizer 'soap' does not take option(s) {', '.join(unknown)}")
    params = [p for p in model.parameters() if trainable(p)]
    matrices = [p for p in params if p.dim() == 2]
    groups = [{"params": matrices, "name": "rotated"}, {"params": [p for p in params if p.dim() != 2], "name": "adam"}]
    groups = [group for group in groups if group["params"]]
    check_coverage(model, groups, "soap param groups", log=logger)
    max_dim = options.get("max_precond_dim", 10000)
    sides = [SOAP.rotated_sides(p.shape, max_dim) for p in matrices]
    logger.info("soap: %d rotated matrices with one side over max_precond_dim=%d, %d with both",
                sum(1 for s in sides if sum(s) == 1), max_dim, sum(1 for s in sides if sum(s) == 0))
    return SOAP(groups, lr=lr, weight_decay=weight_decay, **options)


SOAP_PRECONDITION_FREQUENCY = Flag("soap_precondition_frequency", int, "SOAP: updates between eigenbasis refreshes, "
                                   "f (default 10)", "precondition_frequency", low=1)
SOAP_MAX_PRECOND_DIM = Flag("soap_max_precond_dim", int, "SOAP: a side longer than this is not rotated (default 10000)",
                            "max_precond_dim", low=1)
SOAP_SHAMPOO_BETA = Flag("soap_shampoo_beta", float, "SOAP: decay of the preconditioner statistics (default: beta2)",
                         "shampoo_beta", above=0.0, below=1.0)


def param_state_bytes(param: torch.Tensor, group: dict[str, Any]) -> int:
    """One weight's state after a step (s bytes a state number): step (8) + two moments (2 s n), and for a matrix
    each rotated side of length d (d <= max_precond_dim) its statistics and eigenbasis, 2 s d^2."""
    s = state_element_size(group, param)
    total = NUMBER_BYTES + 2 * s * param.numel()
    if param.dim() == 2:
        total += sum(2 * s * size * size for size, kept in
                     zip(param.shape, SOAP.rotated_sides(param.shape, group["max_precond_dim"])) if kept)
    return total


SPEC = OptimizerSpec(
    "soap", build, OPTIONS, "SOAP: Adam in the eigenbasis of Shampoo's preconditioners",
    cli_flags=(SOAP_PRECONDITION_FREQUENCY, SOAP_MAX_PRECOND_DIM, SOAP_SHAMPOO_BETA), default_eps=1e-8,
    default_betas=(0.95, 0.95),  # SOAP.__init__'s defaults (tested against them)
    from_groups=SOAP, state_bytes=param_state_bytes, scratch_bytes=scratch.soap,
    refuses={"weight_quant": "SOAP has no int8 weight path",
             "fsdp": "SOAP's preconditioners need whole matrices (no gathered update yet)"},
    smoke_lr=3e-3, smoke_options={"precondition_frequency": 2},
    smoke_flags={"lr": 0.003, "soap_precondition_frequency": 2},
    refresh_option="precondition_frequency",
)
