"""Model-side adapters: what is trained changes, not only how. The LoRA and Low-Rank rows of APOLLO's Table 2.

Each row is one `AdapterSpec` (the model-side twin of `apollo.spec.OptimizerSpec`): its name, summary, default
init, whether it keeps a frozen W0, the modes it refuses with their one-line reasons, how it is applied to a
model and how its factors are exported as plain weights. `ADAPTERS` holds them; `--adapter NAME` picks one.
Targets are apollo.routing's low-rank selection (every attention/MLP `nn.Linear`, `DEFAULT_TARGETS`), so the
adapters sit exactly where APOLLO/GaLore project; embed_tokens, lm_head and the RMSNorm weights stay trainable.
Notation (PEERS.md "Table-2 baselines"): target W in R^{m x n} (out x in), A in R^{r x n}, B in R^{m x r},
s = alpha / r, F = sum over targets of r (m + n).

LoRA (peft's `inject_adapter_in_model`, in place):   y = W0 x + s B (A drop(x)),  W0 frozen at its random init.
  Default init: A ~ kaiming_uniform(a = sqrt 5) = U(+-1/sqrt n), B = 0 (peft's `init_lora_weights=True`), so the
  model's function at init is the base model's. Trainable: P_rest + F; frozen: sum m n (in the run dtype, no grad,
  no optimizer state). Names: `<target>.base_layer.weight` (W0), `<target>.lora_A.default.weight` (A, r x n),
  `<target>.lora_B.default.weight` (B, m x r).
Low-Rank (`LowRankLinear`, our module; no W0 is stored):   y = s B (A drop(x)).
  Default init: A and B both at nn.Linear's default U(+-1/sqrt fan_in) (A: 1/sqrt n, B: 1/sqrt r), ReLoRA's
  `lora_only` path; `--lora_init zero_b` sets B = 0. Trainable: P_rest + F. Names: `<target>.lora_A.weight`,
  `<target>.lora_B.weight`.
Both: `--lora_alpha` (s = alpha / r, default 32), `--lora_dropout` (default 0.05, GaLore's LoRA value),
`--lora_init {zero_b, uniform}` (default: the row's). Adapters are applied after `build_model` and before
the optimizer, DDP and --compile; they are created in the model's dtype on its device (meta included).

An optimizer that projects gradients to a rank of its own (its spec takes the option "rank": APOLLO, GaLore,
Fira, Flora) is refused on adapters: the weights are already factored (`refusal`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

import apollo
from apollo.routing import DEFAULT_TARGETS, select_target_modules

#: The adapter section's TrainConfig fields (all refused without --adapter).
FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_init")
INITS = ("zero_b", "uniform")


@dataclass(frozen=True)
class AdapterSettings:
    """Resolved adapter hyper-parameters: rank r, alpha (s = alpha / r), dropout probability, init of the factors."""

    rank: int
    alpha: float
    dropout: float
    init: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter fields of a TrainConfig on their own (same names), for callers without one: train.memory."""

    adapter: str = "none"
    lora_rank: int | None = None
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_init: str | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """One model-side row.

    apply(model, targets, settings): replaces/wraps the (name, nn.Linear) `targets` in place.
    merge(state, settings): a model state dict (checkpoint names) -> the same with each target as one plain
    `<target>.weight` (the exported weight); every other key kept.
    keeps_base: a frozen m x n W0 stays in the model beside the factors.
    refuses: TrainConfig mode (a boolean field) -> why the row cannot run in it.
    flags: the TrainConfig fields it reads (refused without an adapter).
    """

    name: str
    summary: str
    default_init: str
    keeps_base: bool
    apply: Callable[[nn.Module, list[tuple[str, nn.Module]], AdapterSettings], None]
    merge: Callable[[dict[str, torch.Tensor], AdapterSettings], dict[str, torch.Tensor]]
    refuses: Mapping[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = FLAGS

    def __post_init__(self) -> None:
        object.__setattr__(self, "refuses", MappingProxyType(dict(self.refuses)))
        if self.default_init not in INITS:
            raise ValueError(f"AdapterSpec {self.name!r}: default_init must be one of {INITS}")

    def trainable_numbers(self, m: int, n: int, rank: int) -> int:
        """Trainable numbers that replace one m x n target: r (m + n)."""
        return rank * (m + n)

    def frozen_numbers(self, m: int, n: int) -> int:
        """Frozen numbers kept for one m x n target (W0: m n, or 0)."""
        return m * n if self.keeps_base else 0


# ----------------------------------------------------------------------------- Low-Rank


class LowRankLinear(nn.Module):
    """y = s B (A drop(x)) (+ bias): an m x n linear layer stored only as its factors (no m x n weight).

    `lora_A` = nn.Linear(n, r), `lora_B` = nn.Linear(r, m), both bias-free, created on `device` in `dtype`
    with nn.Linear's default init U(+-1/sqrt fan_in); `zero_b` sets B = 0.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float, *,
                 zero_b: bool = False, bias: torch.Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scale = in_features, out_features, rank, scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        if zero_b:
            nn.init.zeros_(self.lora_B.weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale  # (..., m)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _apply_low_rank(model: nn.Module, targets: list[tuple[str, nn.Module]], settings: AdapterSettings) -> None:
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = linear.weight
        setattr(parent, child, LowRankLinear(linear.in_features, linear.out_features, settings.rank, settings.scale,
                                             settings.dropout, zero_b=settings.init == "zero_b", bias=linear.bias,
                                             device=weight.device, dtype=weight.dtype))


def _product(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s B A in float64 (one rounding, to the factors' dtype, by the caller)."""
    return scale * (b.double() @ a.double())


def _merge_low_rank(state: dict[str, torch.Tensor], settings: AdapterSettings) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            out[f"{prefix}.weight"] = _product(value, state[f"{prefix}.lora_B.weight"], settings.scale).to(value.dtype)
        elif not key.endswith(".lora_B.weight"):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- LoRA (peft)

_PEFT_ADAPTER = "default"


def _apply_lora(model: nn.Module, targets: list[tuple[str, nn.Module]], settings: AdapterSettings) -> None:
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft pulls bitsandbytes in

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=[name for name, _ in targets], bias="none",
                        init_lora_weights=settings.init == "zero_b")  # False: both factors at nn.Linear's default
    frozen = {id(linear.weight) for _, linear in targets} | {id(linear.bias) for _, linear in targets}
    inject_adapter_in_model(config, model, adapter_name=_PEFT_ADAPTER)
    for param in model.parameters():  # peft freezes every base tensor; only the targets' W0 stays frozen here
        param.requires_grad_(id(param) not in frozen)


def _merge_lora(state: dict[str, torch.Tensor], settings: AdapterSettings) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    a_suffix, b_suffix = f".lora_A.{_PEFT_ADAPTER}.weight", f".lora_B.{_PEFT_ADAPTER}.weight"
    for key, value in state.items():
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            merged = value.double() + _product(state[prefix + a_suffix], state[prefix + b_suffix], settings.scale)
            out[f"{prefix}.weight"] = merged.to(value.dtype)
        elif key.endswith(".base_layer.bias"):
            out[key.replace(".base_layer.bias", ".bias")] = value
        elif not (key.endswith(a_suffix) or key.endswith(b_suffix)):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- the rows

_QUANT = "int8 weights cannot carry adapters (the factors would sit on quantised layers); drop --weight_quant"

ADAPTERS: Mapping[str, AdapterSpec] = MappingProxyType({spec.name: spec for spec in (
    AdapterSpec("lora", "LoRA: W0 frozen at its random init + (alpha/r) B A trained (peft), GaLore Table 2's LoRA row",
                default_init="zero_b", keeps_base=True, apply=_apply_lora, merge=_merge_lora,
                refuses={"weight_quant": _QUANT}),
    AdapterSpec("low_rank", "Low-Rank: every attention/MLP weight replaced by (alpha/r) B A, no W0 (Table 2's "
                "Low-Rank row)", default_init="uniform", keeps_base=False, apply=_apply_low_rank,
                merge=_merge_low_rank, refuses={"weight_quant": _QUANT}),
)})


def adapter_names() -> list[str]:
    return list(ADAPTERS)


def get_adapter(name: str) -> AdapterSpec:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; choose one of {', '.join(ADAPTERS)}") from None


def settings(config: Any) -> AdapterSettings:
    """The resolved settings of a TrainConfig-like object with an adapter (its lora_* fields)."""
    spec = get_adapter(config.adapter)
    return AdapterSettings(rank=config.lora_rank, alpha=float(config.lora_alpha), dropout=float(config.lora_dropout),
                           init=config.lora_init or spec.default_init)


def refusal(config: Any) -> str | None:
    """The one-line reason `config` cannot run with its adapter (a mode the row refuses, or an optimizer that
    projects to a rank of its own), or None. Derived from the specs; needs no model."""
    if config.adapter == "none":
        return None
    spec = get_adapter(config.adapter)
    for mode, reason in spec.refuses.items():
        if getattr(config, mode, False):
            return f"--adapter {spec.name} does not combine with --{mode}: {reason}"
    if "rank" in apollo.get_spec(config.optimizer).options:
        return (f"--adapter {spec.name} does not work with --optimizer {config.optimizer}: it projects the attention/MLP "
                f"gradients to a rank of its own, and the adapters already factor those weights (the published rows "
                f"train them with adamw)")
    return None


def targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the attention/MLP linears the adapters go on (apollo.routing's low-rank selection)."""
    return [(name, module) for name, module in select_target_modules(model, DEFAULT_TARGETS, types=(nn.Linear,))
            if module.weight.dim() == 2]


def apply_adapter(model: nn.Module, config: Any) -> dict[str, int]:
    """Apply `config.adapter` to `model` in place (nothing for "none"); returns the counts it makes
    (targets, factor numbers F, frozen numbers, trainable numbers, total numbers).

    ValueError (one line) when the rank is not below min(m, n) of a target or nothing is targeted.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config.adapter == "none":
        return {"targets": 0, "factors": 0, "frozen": 0, "trainable": trainable, "total": trainable}
    spec, chosen = get_adapter(config.adapter), targets(model)
    resolved = settings(config)
    if not chosen:
        raise ValueError(f"--adapter {spec.name}: the model has no attention/MLP nn.Linear to adapt")
    for name, linear in chosen:
        m, n = linear.weight.shape
        if resolved.rank >= min(m, n):
            raise ValueError(f"--lora_rank {resolved.rank} must be smaller than min(m, n) = {min(m, n)} of {name} "
                             f"({m} x {n}): a rank that large is no compression")
    factors = sum(spec.trainable_numbers(*linear.weight.shape, resolved.rank) for _, linear in chosen)
    frozen = sum(spec.frozen_numbers(*linear.weight.shape) for _, linear in chosen)
    spec.apply(model, chosen, resolved)
    counts = {"targets": len(chosen), "factors": factors, "frozen": frozen,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in model.parameters())}
    if counts["frozen"] != counts["total"] - counts["trainable"]:  # the formula must be what was built
        raise RuntimeError(f"--adapter {spec.name}: {counts['total'] - counts['trainable']} frozen values, "
                           f"expected {counts['frozen']}")
    return counts


def describe(config: Any, counts: dict[str, int]) -> str:
    """One line: the row, its settings and its counts (for the start line and --dry_run)."""
    if config.adapter == "none":
        return "none (every weight trained)"
    spec, resolved = get_adapter(config.adapter), settings(config)
    frozen = (f", frozen W0 {_values(counts['frozen'])} (no grad, no optimizer state)" if spec.keeps_base
              else ", no W0 stored")
    return (f"{spec.name} on {counts['targets']} attention/MLP linears: r {resolved.rank}, alpha {resolved.alpha:g} "
            f"(s {resolved.scale:g}), dropout {resolved.dropout:g}, init {resolved.init}; factors "
            f"{_values(counts['factors'])}, trainable {_values(counts['trainable'])}{frozen}")


def _values(count: int) -> str:
    """'4,352 values' under 100K, else '2.06M values'."""
    return f"{count:,} values" if count < 100_000 else f"{count / 1e6:.2f}M values"


def merge_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A trained model's state dict -> plain LLaMA weights (`<target>.weight`, no adapter keys): LoRA merged as
    W0 + s B A, Low-Rank as s B A, each summed in float64 and rounded once to the stored dtype."""
    if config.get("adapter", "none") == "none":
        return state
    resolved = settings(_Namespace(config))
    return get_adapter(config["adapter"]).merge(state, resolved)


def row_label(config: Mapping[str, Any]) -> str:
    """A saved run config's row: its optimizer, or "optimizer+adapter" (adamw+lora) when it trains adapters,
    "optimizer+relora" when its LoRA factors are merged every --relora updates (ReLoRA is a row of its own,
    not a LoRA setting: the report ranks it apart)."""
    adapter = config.get("adapter", "none")
    if adapter == "lora" and (config.get("relora") or config.get("relora_cycles")):
        adapter = "relora"
    return config["optimizer"] if adapter == "none" else f"{config['optimizer']}+{adapter}"


def choice(config: Mapping[str, Any]) -> AdapterChoice | None:
    """The adapter fields of a saved run config (None without an adapter), for train.memory."""
    if config.get("adapter", "none") == "none":
        return None
    return AdapterChoice(**{key: config[key] for key in ("adapter", *FLAGS) if key in config})


class _Namespace:
    """Attribute access over a saved config dict (config.json, a checkpoint's config)."""

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self.__dict__.update(mapping)
