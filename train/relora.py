"""ReLoRA (Lialin et al. 2023, arXiv 2307.05695) on top of LoRA adapters: periodic merge and re-init of the
factors, pruning of their Adam moments, and (train/schedule.py) the jagged cosine lr.

Notation (PEERS.md, "### ReLoRA"): a target weight W0 (m x n, frozen) carries factors A (r x n) and
B (m x r) with scale s = alpha / r, so the layer computes W0 x + s B A drop(x). u counts the updates
done since the start of the run (resumes included), T_m = --relora, C = --cycle_length.

Merge and re-init, after update u = k T_m + 1 (k >= 1):
    W0 <- W0 + s B A      (the product in float32 or wider, rounded once to W0's dtype and added there)
    A  <- kaiming_uniform(a = sqrt(5))   (U(-1/sqrt(n), 1/sqrt(n)), peft's LoRA init)
    B  <- 0
Since B = 0 afterwards, the network computes the same function (up to W0's round-off); after k merges
W0 = W0_init + sum_j s B_j A_j.

Pruning, after update u = k C + 1 (k >= 1), of the Adam moments exp_avg and exp_avg_sq of every trainable
parameter whose name holds ``lora_`` (every other state, and every ``step`` counter, is kept); exactly one
mode (none given: --reset_optimizer_on_relora, ReLoRA's default):
    random (--reset_optimizer_on_relora = ratio 0.999, or --optimizer_random_pruning rho): each entry is
        zeroed with probability rho (kept where u01 > rho, u01 drawn per entry);
    magnitude (--optimizer_magnitude_pruning rho): per tensor, entries with |x| <= quantile_rho(|x|)
        (torch.quantile of |x| in float32, linear interpolation) are zeroed.
Bias correction is not restarted, so a zeroed entry's next step is about (1 - beta1) / sqrt(1 - beta2)
times a normal one: the lr ramp of --scheduler cosine_restarts is what keeps this stable. When a merge and
a pruning fall on the same update (T_m = C, every published recipe), the merge runs first.
The draws are made on the CPU (the generator's device) and copied to the factors' device: at 1B (r 512,
F ~ 0.5G numbers) a pruning draws 2F uniforms, seconds once every C updates. torch.quantile takes at most
2**24 numbers per tensor (a 7B factor at r 1024 is 11.3M).

Deliberate differences from Guitaricet/relora (HEAD 176f376):
  - the new A and the random pruning masks are drawn from a dedicated CPU `torch.Generator` seeded with
    --seed + 2**32 (never equal to a run's global seed), not from the global RNG: the dropout and data
    streams do not shift at a merge, every DDP replica draws the same A and masks, and the generator's
    state is saved in every checkpoint, so a resume across a merge is bit-identical;
  - the merge's product is formed in float32 (W0's dtype in the published code) and rounded once;
  - --reset_optimizer_on_relora is a switch (the published flag takes true/false and defaults to true;
    here it is the mode used when no other is given, and naming two modes is refused);
  - A and B are never both zero (the published HEAD zeroes both at wrap time: relora issue #18); the
    adapters start from peft's init, A kaiming-uniform and B = 0.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

#: ratio of --reset_optimizer_on_relora (ReLoRA's default mode): random pruning of 99.9% of the entries
RESET_RATIO = 0.999
#: added to --seed for the ReLoRA generator: outside --seed's range [0, 2**32 - 1], so never the global seed
SEED_OFFSET = 2**32
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReLoRAError(ValueError):
    """ReLoRA cannot run with this model or optimizer; the message is one line that says why."""


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, peft LoraLayer, adapter name) for every active adapter with linear factors, in module order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    found.append((name, module, adapter))
    return found


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose name holds ``lora_`` (the published selection), in model order."""
    return [(name, p) for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]


def merge_and_reinit(model: nn.Module, generator: torch.Generator) -> int:
    """W0 <- W0 + s B A, A <- kaiming_uniform(a = sqrt(5)) drawn from `generator`, B <- 0, for every active
    adapter (module order); returns how many were merged."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, module, adapter in layers:
            if getattr(module, "fan_in_fan_out", False):
                raise ReLoRAError(f"{name}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported by the ReLoRA merge")
            base = module.get_base_layer().weight
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            wide = torch.promote_types(base.dtype, torch.float32)
            delta = (b.to(wide) @ a.to(wide)) * module.scaling[adapter]  # (m, r) @ (r, n) = (m, n)
            base.add_(delta.to(base.dtype))
            fresh = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, torch.float32))  # CPU: the generator's device
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            b.zero_()
    return len(layers)


def _moments(model: nn.Module, optimizer: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(parameter name, moment key, tensor) for the Adam moments of every lora_ parameter that has state."""
    state = optimizer.state
    for name, param in lora_parameters(model):
        if param in state:
            for key in MOMENTS:
                yield name, key, state[param][key]


def check_optimizer_states(model: nn.Module, optimizer: Any) -> None:
    """ReLoRAError unless every lora_ parameter's optimizer state holds exp_avg and exp_avg_sq of its own shape
    (Adam's elementwise moments: what the pruning rules are defined on). Call it after an update: states are lazy."""
    for name, param in lora_parameters(model):
        entry = optimizer.state.get(param, {})
        for key in MOMENTS:
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
                found = ", ".join(f"{k} {list(v.shape)}" if isinstance(v, torch.Tensor) else k for k, v in entry.items())
                raise ReLoRAError(f"--relora prunes Adam's elementwise moments (exp_avg, exp_avg_sq of each lora_ factor), "
                                  f"but {type(optimizer).__name__}'s state of {name} {list(param.shape)} holds {found or 'nothing'}; "
                                  "use an Adam-type optimizer such as --optimizer adamw")


def check_meta_states(model: nn.Module, optimizer: Any) -> None:
    """check_optimizer_states before anything exists: one step of `optimizer` over a meta-device `model` (every
    trainable parameter given a meta gradient) creates its real state's keys and shapes, no numbers
    (train/preflight.py; every registered optimizer's meta step is checked by the contract suite)."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.empty_like(param)
    for inner in getattr(optimizer, "optimizers", None) or [optimizer]:  # --layerwise: one optimizer per parameter
        inner.step()
    check_optimizer_states(model, optimizer)


def random_prune_(tensor: torch.Tensor, ratio: float, generator: torch.Generator) -> None:
    """Zero each entry with probability `ratio`: keep where u > ratio, u ~ U[0, 1) drawn on the CPU from `generator`."""
    keep = torch.rand(tensor.shape, generator=generator) > ratio
    tensor.mul_(keep.to(device=tensor.device, dtype=tensor.dtype))


def magnitude_prune_(tensor: torch.Tensor, ratio: float) -> None:
    """Zero every entry with |x| <= quantile_ratio(|x|) (torch.quantile in float32, linear interpolation)."""
    magnitude = tensor.abs()
    threshold = torch.quantile(magnitude.flatten().float(), ratio).to(tensor.dtype)
    tensor.mul_((magnitude > threshold).to(tensor.dtype))


def prune_moments(model: nn.Module, optimizer: Any, *, mode: str, ratio: float, generator: torch.Generator) -> int:
    """Prune exp_avg and exp_avg_sq of every lora_ parameter (model order, exp_avg first); returns the tensor count."""
    count = 0
    with torch.no_grad():
        for _, _, tensor in _moments(model, optimizer):
            if mode == "random":
                random_prune_(tensor, ratio, generator)
            else:
                magnitude_prune_(tensor, ratio)
            count += 1
    return count


def pruning_mode(*, reset_optimizer_on_relora: bool, optimizer_random_pruning: float | None,
                 optimizer_magnitude_pruning: float | None) -> tuple[str, float]:
    """(mode, ratio) from the three published flags; ReLoRAError when more than one is given.

    None given: --reset_optimizer_on_relora, ReLoRA's default.
    """
    given = [flag for flag, on in (("--reset_optimizer_on_relora", reset_optimizer_on_relora),
                                   ("--optimizer_random_pruning", optimizer_random_pruning is not None),
                                   ("--optimizer_magnitude_pruning", optimizer_magnitude_pruning is not None)) if on]
    if len(given) > 1:
        raise ReLoRAError(f"give one optimizer pruning mode for --relora, not {' and '.join(given)}")
    for flag, ratio in (("--optimizer_random_pruning", optimizer_random_pruning),
                        ("--optimizer_magnitude_pruning", optimizer_magnitude_pruning)):
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ReLoRAError(f"{flag} must be in [0, 1), got {ratio}")
    if optimizer_magnitude_pruning is not None:
        return "magnitude", optimizer_magnitude_pruning
    if optimizer_random_pruning is not None:
        return "random", optimizer_random_pruning
    return "random", RESET_RATIO


def check_config(c: Any) -> None:
    """One-line ValueError for a run config whose ReLoRA or jagged-cosine settings cannot work (train.config.resolve);
    --relora_cycles K is resolved here to --relora = --cycle_length = num_training_steps / K.

    --relora needs --scheduler cosine_restarts (a pruned moment's first step is ~3x an Adam step without
    its ramp: ReLoRA's Table 6 diverges) and LoRA adapters; it refuses --fsdp (the merge and the pruning
    work on whole local tensors, not DTensor shards) and --weight_quant (the merge writes W0 in float).
    """
    from train.schedule import check_restarts

    if c.relora_cycles is not None:  # resolve: T_m = C = N / K (the same values again on a resolved config)
        steps, cycles = c.num_training_steps, c.relora_cycles
        if steps % cycles:
            raise ReLoRAError(f"--relora_cycles {cycles} must divide --num_training_steps {steps}")
        for flag in ("relora", "cycle_length"):
            if getattr(c, flag) not in (None, steps // cycles):
                raise ReLoRAError(f"--relora_cycles {cycles} sets --{flag} to {steps // cycles}; leave --{flag} out")
        c.relora = c.cycle_length = steps // cycles
    if c.relora is not None and c.scheduler != "cosine_restarts":
        raise ReLoRAError(f"--relora needs --scheduler cosine_restarts (not {c.scheduler}): moments pruned without the "
                          "restart ramp make the next steps ~3x too large")
    if c.scheduler == "cosine_restarts":
        if c.restart_warmup_steps is None:
            raise ReLoRAError("--scheduler cosine_restarts needs --restart_warmup_steps (the ramp after each restart, "
                              "e.g. 100)")
        check_restarts(num_training_steps=c.num_training_steps, warmup_steps=c.warmup_steps, cycle_length=c.cycle_length,
                       restart_warmup_steps=c.restart_warmup_steps, adjust_step=c.adjust_step, variant=c.restart_variant)
    else:
        for flag, value, default in (("restart_warmup_steps", c.restart_warmup_steps, None), ("adjust_step", c.adjust_step, 0),
                                     ("restart_variant", c.restart_variant, "galore")):
            if value != default:
                raise ReLoRAError(f"--{flag} applies to --scheduler cosine_restarts only, not {c.scheduler}")
        if c.cycle_length is not None and c.relora is None:
            raise ReLoRAError("--cycle_length applies to --scheduler cosine_restarts and --relora only")
    if c.relora is None:
        for flag in ("reset_optimizer_on_relora", "optimizer_random_pruning", "optimizer_magnitude_pruning"):
            if getattr(c, flag) not in (None, False):
                raise ReLoRAError(f"--{flag} needs --relora (the merge interval T_m)")
        return
    adapter = getattr(c, "adapter", "none")
    if adapter == "none":
        raise ReLoRAError("--relora needs --adapter lora (with --lora_rank): it merges the LoRA factors into the frozen "
                          "weights")
    from train.adapters import get_adapter

    if not get_adapter(adapter).keeps_base:
        raise ReLoRAError(f"--relora merges B A into a frozen W0, which --adapter {adapter} does not keep; use an adapter "
                          "with a frozen base weight (--adapter lora)")
    pruning_mode(reset_optimizer_on_relora=c.reset_optimizer_on_relora, optimizer_random_pruning=c.optimizer_random_pruning,
                 optimizer_magnitude_pruning=c.optimizer_magnitude_pruning)
    for flag, why in (("fsdp", "the merge and the pruning work on whole tensors, not FSDP2 shards"),
                      ("weight_quant", "the merge writes the frozen weights in float")):
        if getattr(c, flag):
            raise ReLoRAError(f"--relora does not combine with --{flag}: {why}")


class ReLoRA:
    """The merge/re-init and pruning timetable of one run; `after_update(u)` is called after every update.

    Its state (merge and pruning counts, the generator) is `state_dict()` -> checkpoint -> `load_state_dict`.
    """

    def __init__(self, model: nn.Module, optimizer: Any, *, relora_every: int, cycle_length: int, mode: str,
                 ratio: float, seed: int) -> None:
        if relora_every < 1 or cycle_length < 1:
            raise ReLoRAError(f"--relora and --cycle_length must be positive integers, got {relora_every} and {cycle_length}")
        if mode not in ("random", "magnitude"):
            raise ReLoRAError(f"pruning mode must be random or magnitude, got {mode!r}")
        if not lora_layers(model):
            raise ReLoRAError("--relora needs LoRA adapters on the model (peft LoraLayer modules); none were found")
        self.model, self.optimizer = model, optimizer
        self.relora_every, self.cycle_length, self.mode, self.ratio = relora_every, cycle_length, mode, ratio
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed + SEED_OFFSET)
        self.merges, self.prunes, self.checked = 0, 0, False

    def due(self, updates: int) -> tuple[bool, bool]:
        """(merge, prune) after update `updates` (u = k T_m + 1 and u = k C + 1, k >= 1)."""
        return (updates > 1 and (updates - 1) % self.relora_every == 0,
                updates > 1 and (updates - 1) % self.cycle_length == 0)

    def after_update(self, updates: int) -> list[str]:
        """Run what is due after update `updates` (1-based count of updates done); returns log lines."""
        if not self.checked:  # the states exist from the first update on
            check_optimizer_states(self.model, self.optimizer)
            self.checked = True
        merge, prune = self.due(updates)
        lines = []
        if merge:
            layers = merge_and_reinit(self.model, self.generator)
            self.merges += 1
            lines.append(f"update {updates}: ReLoRA merge {self.merges}: W0 += s B A and A, B re-initialised "
                         f"in {layers} adapted layers")
        if prune:
            tensors = prune_moments(self.model, self.optimizer, mode=self.mode, ratio=self.ratio, generator=self.generator)
            self.prunes += 1
            lines.append(f"update {updates}: ReLoRA {self.mode} pruning {self.prunes} of {tensors} lora_ moment "
                         f"tensors at ratio {self.ratio:g}")
        return lines

    def state_dict(self) -> dict[str, Any]:
        """Numbers and one uint8 tensor (the generator): `torch.load(weights_only=True)` reads it."""
        return {"merges": self.merges, "prunes": self.prunes, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges, self.prunes = int(state["merges"]), int(state["prunes"])
        self.generator.set_state(state["generator"])


def build_relora(model: nn.Module, optimizer: Any, config: Any) -> ReLoRA | None:
    """The run's ReLoRA (None without --relora); `config` is a resolved TrainConfig (check_config passed)."""
    if config.relora is None:
        return None
    mode, ratio = pruning_mode(reset_optimizer_on_relora=config.reset_optimizer_on_relora,
                               optimizer_random_pruning=config.optimizer_random_pruning,
                               optimizer_magnitude_pruning=config.optimizer_magnitude_pruning)
    return ReLoRA(model, optimizer, relora_every=config.relora, cycle_length=config.cycle_length, mode=mode, ratio=ratio,
                  seed=config.seed)


def describe(config: Any) -> str:
    """One line for --dry_run: the timetable and the pruning mode of a --relora config."""
    mode, ratio = pruning_mode(reset_optimizer_on_relora=config.reset_optimizer_on_relora,
                               optimizer_random_pruning=config.optimizer_random_pruning,
                               optimizer_magnitude_pruning=config.optimizer_magnitude_pruning)
    merges = (config.num_training_steps - 1) // config.relora  # after updates k T_m + 1 <= N, k >= 1
    return (f"merge into W0 and re-init every {config.relora:,} updates ({merges} merges, after updates k x "
            f"{config.relora:,} + 1); {mode} pruning of the factors' Adam moments at {ratio:g} after updates k x "
            f"{config.cycle_length:,} + 1")
