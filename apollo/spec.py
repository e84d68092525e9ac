"""`OptimizerSpec`: every fact about one optimizer, declared next to it (its module's ``SPEC`` / ``SPECS``).

`apollo.registry` collects the specs; the training harness derives from them its optimizer flags (a `Flag`
declared by the spec(s) that own it becomes a TrainConfig field and a ``--flag``), which flag reaches which
option, the default betas, whether states follow the weights' dtype and which modes are refused (with
the one-line reason), so that none of those tables names an optimizer. torch's ``optim_db`` /
``OptimizerInfo`` is the model.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

#: The memory/parallel modes a spec can refuse (TrainConfig fields of the same name).
MODES = ("weight_quant", "layerwise", "fsdp")
#: The training flags besides its own that an optimizer's recipe may set (see OptimizerSpec.recipes).
RECIPE_TRAINING_FLAGS = ("lr", "rank", "beta1", "beta2", "eps", "weight_decay", "num_training_steps")
STANDARD_BETAS = (0.9, 0.999)

#: The sources of published results a spec's ``published`` cites: one label per paper/repository and setting
#: (../shared/reference PROTOCOL.md, PEERS.md), written once here so that the specs citing a source agree on it.
APOLLO_PAPER_60M = "APOLLO paper, LLaMA-60M, 10K updates of 512 x 256 tokens (PROTOCOL.md)"
SCALE_RUNS_60M = "SCALE repository's runs, LLaMA-60M, 11K updates (PEERS.md)"
ADAM_MINI_PAPER_67M = "Adam-mini paper, 67M, torchtitan Chinchilla tokens (PEERS.md)"


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Flag:
    """A training CLI flag an optimizer owns: ``--name``, a TrainConfig field generated from the specs (train/config.py).

    Declared once (a module-level constant of the module that owns it) and listed in the ``cli_flags`` of every
    spec that takes it; a spec may also map a flag another spec declares by name in its ``flags``.
    kind: int, float, str or bool (a bool flag is store_true and defaults to False). default: None means "the
    optimizer's own default": the option is passed only when the flag is set away from it. help: its --help
    text (the harness adds which optimizers take it, and each spec's ``flag_help`` note). choices, and the
    numeric domain ``low <= value <= high``, ``above < value < below`` (train.config.option's metadata, enforced
    by check_domains). option: the build option it sets (a spec's ``flags`` may map it to another);
    negated: the option is ``not value`` (``--muon_no_nesterov`` -> ``nesterov=False``).
    """

    name: str
    kind: type
    help: str
    option: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    negated: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str, bool):
            raise ValueError(f"Flag --{self.name}: kind must be int, float, str or bool, not {self.kind!r}")
        if self.kind is bool and self.default is not False:
            raise ValueError(f"Flag --{self.name}: a bool flag is store_true, its default is False")
        if self.negated and self.kind is not bool:
            raise ValueError(f"Flag --{self.name}: only a bool flag can be negated")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how to build it and what it takes, supports and refuses.

    name: the canonical ``--optimizer`` / `apollo.build_optimizer` name; aliases: other accepted names.
    build: ``(model, lr, weight_decay, **options) -> torch.optim.Optimizer`` (its routing lives there).
    options: the option keys ``build`` accepts (anything else is refused with one line).
    summary: one line for ``--help`` and the README.
    cli_flags: the `Flag`s it takes (the CLI flags are generated from the registered specs' cli_flags; a flag
    shared by several optimizers is one `Flag` object listed by each).
    flags: training CLI flag (a TrainConfig field) -> the option key it sets: its cli_flags' own options, plus
    (or overriding them) what is given here, which may name a flag another spec declares; ``negated_flags``:
    flags that set their option to ``not value`` (``--muon_no_nesterov`` -> ``nesterov=False``; a negated
    `Flag` is added). flag_help: flag -> a note on what it means for this optimizer (its default), in --help.
    default_betas: what it uses when ``--beta1/--beta2`` are not given; default_eps: the eps it uses when
    ``--eps`` is not given (of its Adam-type part; None: not stated).
    states_follow_weights: its states always take the weights' dtype (no float32 states for bf16 weights).
    refuses: mode (one of `MODES`) -> why it cannot run in it.
    from_groups: the optimizer over explicit param groups, ``from_groups(groups, **kwargs)`` (its class, or a
    function that builds it as ``build`` does): how integrations that make their own groups construct it.
    state_bytes: its state formula, ``state_bytes(param, group) -> bytes`` that ``optimizer.state[param]`` holds
    after a step, for a float, unsharded `param` of the param group `group` (as `apollo.optimizer_state_bytes`
    counts: tensors at their size, a Python number 8 bytes); the contract test checks it against a real step.
    scratch_bytes: its memory model, ``scratch_bytes(param, group, *, name, p, device)`` -> bytes of the
    temporaries one parameter's update allocates (apollo/scratch.py has the derivations); train.memory refuses
    an optimizer without one. torch_adamw_groups: a param group (or None: not in one) -> whether torch.optim.AdamW
    updates its parameters (None: no group), for train.memory's CUDA foreach term (torch AdamW takes
    sqrt(v) of all those parameters at once: p N_all bytes). fused_low_rank: its groups with a ``rank`` step through
    apollo/fused.py a chunk of weights at a time (train.memory counts the largest chunk, scratch.fused_step).
    requires: the import names of optional packages it needs (``("bitsandbytes",)``); `available` says whether they
    are installed, so that checks over the registry skip it where they are not.
    smoke_lr, smoke_options: an lr and options that train a tiny LLaMA in a few updates and reach the
    optimizer's periodic work (a projection or basis refresh every 2 updates): what the contract tests
    (tests/apollo/test_contract.py) and the CLI smoke runs use. smoke_flags: the training CLI flags of the
    same settings (a flag name -> value), for the 4-update runs of tests/train/test_peers.py.
    published: source label (the constants above, e.g. `APOLLO_PAPER_60M`) -> the validation perplexity that
    source reports for this optimizer; the study report (train/study/report.py) lists them, per source, for reference.
    refresh_option: the option that sets how many updates pass between refreshes of its projection or basis
    (``update_proj_gap``, SOAP's ``precondition_frequency``; 1 makes every step a refresh step), None when it
    has no periodic refresh: the benchmarks time a refresh step apart for the optimizers that have one.
    recipes: model size ("60m", ..., "7b") -> the training CLI flags (name -> value) of its published recipe there:
    the optimizer's own flags and lr, a step count or weight decay only where they differ from PROTOCOL.md's
    (scripts/benchmark_c4/llama_<size>_<name or alias>.sh carries them; tests/train/test_recipes.py checks it).
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    options: frozenset[str]
    summary: str
    aliases: tuple[str, ...] = ()
    cli_flags: tuple[Flag, ...] = ()
    flags: Mapping[str, str] = field(default_factory=dict)
    negated_flags: frozenset[str] = frozenset()
    flag_help: Mapping[str, str] = field(default_factory=dict)
    default_betas: tuple[float, float] = STANDARD_BETAS
    default_eps: float | None = None
    states_follow_weights: bool = False
    refuses: Mapping[str, str] = field(default_factory=dict)
    from_groups: Callable[..., torch.optim.Optimizer] | None = None
    state_bytes: Callable[[torch.Tensor, dict], int] | None = None
    scratch_bytes: Callable[..., int] | None = None
    torch_adamw_groups: Callable[[dict | None], bool] | None = None
    fused_low_rank: bool = False
    smoke_lr: float = 1e-2
    smoke_options: Mapping[str, Any] = field(default_factory=dict)
    smoke_flags: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    published: Mapping[str, float] = field(default_factory=dict)
    refresh_option: str | None = None
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.options))
        object.__setattr__(self, "cli_flags", tuple(self.cli_flags))
        object.__setattr__(self, "flags", _frozen({**{f.name: f.option for f in self.cli_flags}, **self.flags}))
        object.__setattr__(self, "negated_flags",
                           frozenset(self.negated_flags) | {f.name for f in self.cli_flags if f.negated})
        object.__setattr__(self, "flag_help", _frozen(self.flag_help))
        object.__setattr__(self, "refuses", _frozen(self.refuses))
        object.__setattr__(self, "smoke_options", _frozen(self.smoke_options))
        object.__setattr__(self, "smoke_flags", _frozen(self.smoke_flags))
        object.__setattr__(self, "published", _frozen(self.published))
        object.__setattr__(self, "recipes", _frozen({size: _frozen(flags) for size, flags in self.recipes.items()}))
        unknown_modes = sorted(set(self.refuses) - set(MODES))
        if unknown_modes:
            raise ValueError(f"OptimizerSpec {self.name!r}: unknown mode(s) {unknown_modes}; modes are {MODES}")
        unknown_options = sorted(set(self.flags.values()) - self.options)
        if unknown_options:
            raise ValueError(f"OptimizerSpec {self.name!r}: flags set option(s) {unknown_options} it does not take")
        if self.refresh_option is not None and self.refresh_option not in self.options:
            raise ValueError(f"OptimizerSpec {self.name!r}: refresh_option {self.refresh_option!r} is not among its options")
        unknown_recipe_flags = sorted({flag for flags in self.recipes.values() for flag in flags}
                                      - set(self.flags) - set(RECIPE_TRAINING_FLAGS))
        if unknown_recipe_flags:
            raise ValueError(f"OptimizerSpec {self.name!r}: recipes set flag(s) {unknown_recipe_flags} it does not take")
        unknown_smoke = sorted(set(self.smoke_options) - self.options)
        if unknown_smoke:
            raise ValueError(f"OptimizerSpec {self.name!r}: smoke_options {unknown_smoke} are not among its options")
        if not set(self.negated_flags) <= set(self.flags):
            raise ValueError(f"OptimizerSpec {self.name!r}: negated flags must be among its flags")
        bad_published = sorted(source for source, ppl in self.published.items() if not ppl > 1.0)
        if bad_published:
            raise ValueError(f"OptimizerSpec {self.name!r}: published perplexities must be > 1, not at {bad_published}")
        if not set(self.flag_help) <= set(self.flags):
            raise ValueError(f"OptimizerSpec {self.name!r}: flag_help notes flags it does not take")

    @property
    def available(self) -> bool:
        """Whether every package of `requires` can be imported here."""
        return all(importlib.util.find_spec(module) is not None for module in self.requires)

    @property
    def takes_eps(self) -> bool:
        return "eps" in self.options

    @property
    def takes_betas(self) -> bool:
        return "betas" in self.options

    def flag_value(self, flag: str, value: Any) -> Any:
        """The option value a CLI flag's value means for this optimizer."""
        return (not value) if flag in self.negated_flags else value
