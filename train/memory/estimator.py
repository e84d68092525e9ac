r"""The estimate of one step's peak memory per process, from the meta model and the terms; nothing allocated.

Terms (notation: `train.memory`'s docstring; each in its module):

weights        every parameter and buffer (int8 weights: 1 byte per element + 5 per group: s, z)
states         apollo.optimizer_state_bytes after one meta step (`train.memory.meta`)
gradients      all gradients (p n each; an int8 weight's float_grad too); layer-wise: the largest one
activations    `train.memory.terms`
scratch        `train.memory.scratch` (per optimizer)
DDP buckets, FSDP2   `train.memory.fsdp`
total (peak)   weights + states (+ DDP buckets) + the largest of these phases of a step:
                 backward start       activations (+ every gradient, or its shard under FSDP2, when accumulating)
                 lm_head gradient     saved - 4 V N (log-softmax freed) + recompute + lm_head's gradient
                                      (layer-wise: + the largest gradient + scratch of a non-embedding weight)
                 end of backward      outside-layer activations - 4 V N + recompute + all gradients
                                      (+ the embedding's gradient, in flight, when it is added into an
                                      existing buffer; layer-wise: the embedding's gradient + scratch)
                 optimizer step       all gradients + scratch (normal mode)
               Activations are freed as gradients appear, so the peak sits at one of these ends.
               `Estimate.breakdown` holds the terms of the peak phase: they add up to the total.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import apollo
from apollo.quant import QuantLinear, is_quantized
from train.memory.fsdp import ddp_bucket_bytes, fsdp_phases, fsdp_terms, shard_numel, sharded_state_bytes
from train.memory.meta import DTYPE_BYTES, GB, _bytes, _grad_bytes, build, resolve_state_dtype, step_on_meta
from train.memory.scratch import step_scratch, update_scratch
from train.memory.terms import activations
from train.optimizer_flags import MODES

PHASES = ("backward start", "lm_head gradient", "end of backward", "optimizer step")


@dataclass
class Estimate:
    """Bytes per term. `gradients`, `activations`, `update_scratch` are each term's largest value in a step;
    `total` is the modelled peak, and `breakdown` the terms alive at that peak (they sum to `total`)."""

    parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    update_scratch: int
    total: int
    notes: dict[str, str] = field(default_factory=dict)
    ddp_buckets: int = 0  # DistributedDataParallel's flat gradient buckets (several processes only)
    peak_phase: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # every phase's total

    def terms(self) -> dict[str, int]:
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer states": self.optimizer_states,
                 "activations": self.activations, "update scratch": self.update_scratch}
        if self.ddp_buckets:
            terms["DDP buckets"] = self.ddp_buckets
        return {**terms, "total (peak)": self.total}

    def peak_line(self) -> str:
        """'weights 1.23 + ... = 4.56 GB (peak: end of backward)': the terms that add up to the total."""
        parts = " + ".join(f"{name} {value / GB:.2f}" for name, value in self.breakdown.items())
        return f"{parts} = {self.total / GB:.2f} GB (peak: {self.peak_phase})"


@dataclass
class _Param:
    name: str
    grad: int  # gradient bytes (this rank's shard under FSDP2)
    scratch: int  # the update's temporaries
    in_buckets: bool  # its gradient lives in DDP's buckets (BucketViewDDP)


@dataclass
class _Static:
    """What does not depend on the micro-batch: built once per model, optimizer and mode (`prepare`)."""

    config: object
    name: str
    p: int  # bytes per weight element
    act_p: int  # bytes per activation element (the compute dtype)
    parameters: int
    weights: int
    states: int
    buckets: int
    params: list[_Param]
    scratch: int
    scratch_note: str
    dequantised: int
    head: int  # lm_head's gradient bytes
    embedding: int  # the input embedding's gradient bytes
    embedding_name: str
    tied: bool
    layerwise: bool
    accumulation: int
    fsdp: dict | None
    notes: dict[str, str]
    adapter_rank: int = 0  # --adapter: its factors' activations (train.memory.terms)
    adapter_dropout: bool = False


def prepare(config, *, optimizer: str = apollo.BASELINE, rank: int | None = None, weight_quant: bool = False,
            weight_group_size: int = 128, weight_bits: int = 8, stochastic_round: bool = False,
            layerwise: bool = False, dtype: str = "bfloat16", state_dtype: str | None = None, device: str = "cuda",
            world_size: int = 1, gradient_accumulation: int = 1, ddp_bucket_view: bool = True, fsdp: bool = False,
            fsdp_mixed_precision: bool = False, options: dict | None = None, adapter=None) -> _Static:
    """The batch-independent part of `estimate` (the model, the optimizer's meta step, every gradient and
    update's scratch); `combine(static, batch_size, max_length, ...)` adds the activations and the phases."""
    name = apollo.canonical_name(optimizer)
    state_dtype = resolve_state_dtype(name, state_dtype)
    if fsdp and world_size < 2:
        raise ValueError("fsdp shards over processes: world_size must be > 1")
    if fsdp and (weight_quant or layerwise):
        raise ValueError(f"--fsdp does not combine with --{'weight_quant' if weight_quant else 'layerwise'}")
    if layerwise and (world_size > 1 or gradient_accumulation > 1):
        raise ValueError("--layerwise runs on one process without gradient accumulation")
    if adapter is not None and adapter.adapter != "none":  # the refusals of its spec (train/adapters.py)
        from train.adapters import refusal
        refused = refusal(SimpleNamespace(adapter=adapter.adapter, optimizer=name, weight_quant=weight_quant,
                                          layerwise=layerwise, fsdp=fsdp))
        if refused:
            raise ValueError(refused)
    else:
        adapter = None
    for mode, on in (("weight_quant", weight_quant), ("layerwise", layerwise), ("fsdp", fsdp)):
        if on and name in MODES[mode]:
            raise ValueError(f"--{mode} does not work with --optimizer {name}: {MODES[mode][name]}")
    p = DTYPE_BYTES[dtype]
    model = build(config, dtype=dtype, device="meta", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  weight_bits=weight_bits, adapter=adapter)
    config = model.config
    p_dtype = next(p_ for p_ in model.parameters() if p_.is_floating_point()).dtype

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(_bytes(t) for t in tensors.values())
    optimizer_on_meta = step_on_meta(model, name, rank=rank, state_dtype=state_dtype, p_dtype=p_dtype, options=options)
    states = (sharded_state_bytes(optimizer_on_meta, world_size) if fsdp
              else apollo.optimizer_state_bytes(optimizer_on_meta))
    groups = {id(param): group for group in optimizer_on_meta.param_groups for param in group["params"]}
    names = {id(param): param_name for param_name, param in model.named_parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad or is_quantized(q)]
    viewed = world_size > 1 and not fsdp and ddp_bucket_view
    per_param = [_Param(names[id(q)], _grad_bytes(q, p) if not fsdp else shard_numel(q.shape, world_size) * q.element_size(),
                        update_scratch(q, groups.get(id(q)), name=name, p=p, device=device, stochastic_round=stochastic_round),
                        viewed and q.requires_grad and q.is_floating_point())
                 for q in trainable]
    dequantised = max(((4 + (p if p != 4 else 0)) * q.numel() for q in trainable if is_quantized(q)), default=0)
    notes = {"state dtype": dtype if state_dtype == "param" else state_dtype}

    # the update's scratch (normal mode): the largest parameter's, a fused chunk's, or torch AdamW's foreach
    if layerwise:
        scratch, scratch_note = 0, ""
    else:
        scratch, scratch_note = step_scratch(per_param, trainable, groups, optimizer_on_meta.param_groups,
                                             name=name, p=p, device=device)

    fsdp_info = None
    if fsdp:
        weights, fsdp_info = fsdp_terms(model, world_size, p=p, mixed_precision=fsdp_mixed_precision)
        notes["weights"] = f"this rank's shards (1/{world_size} of the rows of every tensor)"
        notes["optimizer states"] = "this rank's shards of the row-split states; low-rank moments, projections whole"
    buckets = ddp_bucket_bytes(trainable) if world_size > 1 and not fsdp else 0
    if weight_quant:
        quantized = [q for q in trainable if is_quantized(q)]
        int8 = sum(q.numel() for q in quantized)
        extra = sum(_bytes(m.weight_scales) + _bytes(m.weight_zeros) + _bytes(m.rounding_state)
                    for m in model.modules() if isinstance(m, QuantLinear))
        notes["weights"] = f"int8 {int8 / GB:.2f} + scales/zeros {extra / GB:.2f} + {dtype} {(weights - int8 - extra) / GB:.2f}"
    head_param, embedding_param = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    grads = {item.name: item.grad for item in per_param}
    return _Static(config=config, name=name, p=p, act_p=2 if fsdp_mixed_precision else p,
                   parameters=sum(q.numel() for q in model.parameters()), weights=weights, states=states,
                   buckets=buckets, params=per_param, scratch=scratch, scratch_note=scratch_note,
                   dequantised=dequantised, head=grads.get(names[id(head_param)], 0),
                   embedding=grads.get(names[id(embedding_param)], 0), embedding_name=names[id(embedding_param)],
                   tied=head_param is embedding_param, layerwise=layerwise, accumulation=gradient_accumulation,
                   fsdp=fsdp_info, notes=notes, adapter_rank=adapter.lora_rank if adapter else 0,
                   adapter_dropout=bool(adapter and adapter.lora_dropout > 0))


def combine(static: _Static, batch_size: int, max_length: int, *, activation_checkpointing: bool = False,
            packing: bool = False) -> Estimate:
    """`estimate` from its batch-independent part: activations, then the peak over the phases of a step."""
    acts = activations(static.config, batch_size, max_length, static.act_p, checkpointing=activation_checkpointing,
                       padded=not packing, adapter_rank=static.adapter_rank, adapter_dropout=static.adapter_dropout)
    dequantised = static.dequantised
    notes = dict(static.notes)
    activation_peak = acts.saved + max(acts.loss_work, acts.recompute, dequantised)
    after_head = acts.saved - acts.log_softmax + acts.recompute
    remaining = acts.outside - acts.log_softmax  # what is still saved when the last layer's gradients appear
    notes["activations"] = (f"saved {acts.saved / GB:.3f} + the largest of: loss {acts.loss_work / GB:.3f}"
                            + (f", recomputed layer {acts.recompute / GB:.3f}" if activation_checkpointing else "")
                            + (f", dequantised weight {dequantised / GB:.3f}" if dequantised else ""))
    params = static.params
    # each phase: {term: bytes} of what is alive besides weights, states and buckets
    if static.layerwise:  # one gradient (and its update's scratch) at a time; the embedding's comes last
        others = [item for item in params if item.name != static.embedding_name] or params
        during = max(others, key=lambda item: item.grad + item.scratch)
        last = next((item for item in params if item.name == static.embedding_name), during)
        worst = max(params, key=lambda item: item.grad + item.scratch)
        gradients, scratch = worst.grad, worst.scratch
        notes["gradients"] = f"largest single gradient ({worst.name}), freed at once"
        notes["update scratch"] = f"temporaries of {worst.name}'s update"
        phases = {"backward start": {"activations": activation_peak},
                  "lm_head gradient": {"activations": after_head, "gradients": during.grad,
                                       "update scratch": during.scratch},
                  "end of backward": {"activations": remaining, "gradients": last.grad, "update scratch": last.scratch}}
    else:
        own = sum(item.grad for item in params if not item.in_buckets)  # gradients held by the parameters
        gradients = sum(item.grad for item in params)
        accumulating = static.accumulation > 1
        held = own if accumulating else 0  # micro-steps >= 2 start with every gradient of the earlier ones
        # the embedding's gradient is computed last; it is a transient when it is added into an existing buffer
        in_flight = static.embedding if (accumulating or static.tied or static.buckets and any(
            item.in_buckets for item in params)) else 0
        scratch = static.scratch
        notes["update scratch"] = static.scratch_note
        notes["gradients"] = "every parameter's gradient" + (" (in DDP's buckets)" if own < gradients else "")
        phases = {"backward start": {"activations": activation_peak, "gradients": held},
                  "lm_head gradient": {"activations": after_head, "gradients": held + static.head},
                  "end of backward": {"activations": remaining + acts.recompute, "gradients": own + in_flight},
                  "optimizer step": {"gradients": own, "update scratch": scratch}}
        if static.fsdp:
            fsdp_phases(phases, static.fsdp, head=static.head, after_head=after_head, own=own,
                        accumulating=accumulating)
            notes["gradients"] = f"this rank's shards of every gradient (1/{static.fsdp['world_size']})"
    totals = {phase: sum(parts.values()) for phase, parts in phases.items()}
    peak_phase = max(totals, key=lambda phase: totals[phase])
    resident = {"weights": static.weights, "optimizer states": static.states}
    if static.buckets:
        resident["DDP buckets"] = static.buckets
    breakdown = {**resident, **{term: value for term, value in phases[peak_phase].items() if value}}
    total = sum(breakdown.values())
    base = sum(resident.values())
    return Estimate(static.parameters, static.weights, gradients, static.states, activation_peak, scratch, total, notes,
                    static.buckets, peak_phase, breakdown, {phase: base + value for phase, value in totals.items()})


def estimate(config, *, optimizer: str = apollo.BASELINE, batch_size: int = 1, max_length: int = 256,
             rank: int | None = None,
             weight_quant: bool = False, weight_group_size: int = 128, weight_bits: int = 8, stochastic_round: bool = False,
             layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "bfloat16",
             state_dtype: str | None = None, packing: bool = False, device: str = "cuda", world_size: int = 1,
             gradient_accumulation: int = 1, ddp_bucket_view: bool = True, fsdp: bool = False,
             fsdp_mixed_precision: bool = False, options: dict | None = None, adapter=None) -> Estimate:
    """Estimate the memory of a training step per process (module docstring); nothing is allocated.

    `config`: a LlamaConfig or a path to its json. `optimizer`: any registered name. `state_dtype`:
    "float32" or "param"; None picks the harness default (float32, except for torch AdamW, Muon and 8-bit
    AdamW, whose states follow the weights). `device`: "cuda" or "cpu" (only some scratch terms differ).
    `world_size` > 1: DDP (its buckets; `ddp_bucket_view=False` models torch's plain DDP, which keeps a
    second copy of every gradient) or, with `fsdp`, FSDP2's shards. `gradient_accumulation` > 1: the
    gradients of the earlier micro-steps are alive through the later ones. `options`: further
    `apollo.build_optimizer` options (only those the optimizer takes). `adapter`: a TrainConfig or
    `train.adapters.AdapterChoice` whose --adapter is applied (frozen W0 counted in the weights, in the model
    dtype, with no gradient and no state; the factors' activations in `train.memory.terms`).
    """
    static = prepare(config, optimizer=optimizer, rank=rank, weight_quant=weight_quant,
                     weight_group_size=weight_group_size, weight_bits=weight_bits, stochastic_round=stochastic_round,
                     layerwise=layerwise, dtype=dtype, state_dtype=state_dtype, device=device, world_size=world_size,
                     gradient_accumulation=gradient_accumulation, ddp_bucket_view=ddp_bucket_view, fsdp=fsdp,
                     fsdp_mixed_precision=fsdp_mixed_precision, options=options, adapter=adapter)
    return combine(static, batch_size, max_length, activation_checkpointing=activation_checkpointing, packing=packing)
