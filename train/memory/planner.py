"""The planner: the largest micro-batch per optimizer and memory mode whose estimated peak fits a card.

    python -m train.memory --model_config configs/llama_7b.json --gpu_memory 80GiB --max_batch

One meta step per optimizer and weight format (`planner_statics`), then a doubling and bisection over
the batch on the batch-dependent part (`train.memory.estimator.combine`): the peak grows with the batch.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import apollo
from train.memory.estimator import _Static, combine, prepare
from train.memory.meta import GB, LOW_RANK
from train.optimizer_flags import MODES

#: memory mode -> the estimate() flags it sets
PLANNER_MODES = {"plain": {}, "int8 weights": {"weight_quant": True}, "layer-wise": {"layerwise": True},
                 "activation checkpointing": {"activation_checkpointing": True}}


def largest_batch(static: _Static, gpu_bytes: float, max_length: int, *, activation_checkpointing: bool = False,
                  packing: bool = False, limit: int = 1 << 20) -> int:
    """The largest micro-batch b (0 if none) whose estimated peak fits in `gpu_bytes`: the peak grows with b."""
    def fits(b: int) -> bool:
        return combine(static, b, max_length, activation_checkpointing=activation_checkpointing,
                       packing=packing).total <= gpu_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class PlanRow:
    optimizer: str
    mode: str
    batch: int | None  # None: refused
    peak: int = 0
    headroom: float = 0.0
    ratio: float | None = None  # batch / AdamW's batch in the same mode (or AdamW plain, `ratio_note`)
    note: str = ""


def planner_statics(config, *, optimizers: list[str] | None = None, modes: list[str] | None = None,
                    world_size: int = 1, fsdp: bool = False, fsdp_mixed_precision: bool = False,
                    dtype: str = "bfloat16", state_dtype: str | None = None, rank: int | None = None,
                    device: str = "cuda", weight_group_size: int = 128, gradient_accumulation: int = 1,
                    adapters: list | None = None):
    """(optimizer, mode, the `_Static` of that run or the reason it is refused), AdamW first in each mode.

    `adapters` (train.adapters.AdapterChoice, e.g. LoRA and Low-Rank at rank r): after the optimizers, one row
    per adapter and mode, named "adamw+<adapter>" (the published rows train the factors with AdamW).

    A mode an optimizer refuses (train.optimizer_flags.MODES, layer-wise with several processes, int8 or
    layer-wise with FSDP2) gets its reason. One meta step per optimizer and weight format: activation
    checkpointing changes only the activations, layer-wise only when gradients and updates happen
    (the same states, tested), so both reuse the plain run's.
    """
    optimizers = [apollo.canonical_name(o) for o in (optimizers or apollo.optimizer_names())]
    cache: dict[tuple[str, bool], _Static | str] = {}
    for mode in modes or list(PLANNER_MODES):
        flags = PLANNER_MODES[mode]
        for name in [apollo.BASELINE] + [o for o in optimizers if o != apollo.BASELINE]:
            refusal = None
            for flag in ("weight_quant", "layerwise"):
                if flags.get(flag) and name in MODES[flag]:
                    refusal = MODES[flag][name]
            if flags.get("layerwise") and world_size > 1:
                refusal = "layer-wise updates run on one process"
            if fsdp and (flags.get("weight_quant") or flags.get("layerwise")):
                refusal = f"--fsdp does not combine with --{'weight_quant' if flags.get('weight_quant') else 'layerwise'}"
            if fsdp and name in MODES["fsdp"]:
                refusal = MODES["fsdp"][name]
            if refusal:
                yield name, mode, refusal
                continue
            int8 = flags.get("weight_quant", False)
            key = (name, int8)
            if key not in cache:
                try:
                    # a preset with a fixed rank (APOLLO-Mini's 1) keeps it
                    fixed = apollo.PRESETS.get(name, {}).get("rank") is not None
                    own_rank = rank if name in LOW_RANK and not fixed else None
                    cache[key] = prepare(config, optimizer=name, rank=own_rank, dtype=dtype,
                                         state_dtype=state_dtype, device=device, world_size=world_size, fsdp=fsdp,
                                         fsdp_mixed_precision=fsdp_mixed_precision, weight_group_size=weight_group_size,
                                         gradient_accumulation=gradient_accumulation, weight_quant=int8,
                                         stochastic_round=int8)
                except ValueError as error:
                    cache[key] = str(error)
            static = cache[key]
            if isinstance(static, _Static) and flags.get("layerwise"):
                static = dataclasses.replace(static, layerwise=True, accumulation=1, scratch=0, scratch_note="")
            yield name, mode, static
        for choice in adapters or []:
            row = f"{apollo.BASELINE}+{choice.adapter}"  # the published adapter rows train their factors with AdamW
            if flags.get("layerwise") and world_size > 1:
                yield row, mode, "layer-wise updates run on one process"
                continue
            key = (row, flags.get("weight_quant", False), choice)
            if key not in cache:
                try:
                    cache[key] = prepare(config, optimizer=apollo.BASELINE, dtype=dtype, state_dtype=state_dtype,
                                         device=device, world_size=world_size, fsdp=fsdp,
                                         fsdp_mixed_precision=fsdp_mixed_precision,
                                         gradient_accumulation=gradient_accumulation, adapter=choice,
                                         weight_quant=flags.get("weight_quant", False),
                                         layerwise=flags.get("layerwise", False) and not fsdp)
                except ValueError as error:
                    cache[key] = str(error)
            static = cache[key]
            if isinstance(static, _Static) and flags.get("layerwise"):
                static = dataclasses.replace(static, layerwise=True, accumulation=1, scratch=0, scratch_note="")
            yield row, mode, static


def plan(config, gpu_bytes: float, *, max_length: int = 256, optimizers: list[str] | None = None,
         modes: list[str] | None = None, packing: bool = False, statics=None, **settings) -> list[PlanRow]:
    """For each optimizer and memory mode: the largest micro-batch whose estimated peak fits in `gpu_bytes`.

    `settings`: those of `planner_statics` (world_size, fsdp, dtype, state_dtype, rank, device, ...);
    `statics`: its output, to plan several budgets from one set of meta steps. A refused mode gets
    `batch=None` and the reason. `ratio`: batch over AdamW's in the same mode (AdamW plain where AdamW
    cannot run the mode: noted).
    """
    chosen = [apollo.canonical_name(o) for o in (optimizers or apollo.optimizer_names())]
    if statics is None:
        statics = list(planner_statics(config, optimizers=optimizers, modes=modes, **settings))
    rows, adamw = [], {}
    for name, mode, static in statics:
        if isinstance(static, str):
            row = PlanRow(name, mode, None, note=static)
        else:
            ckpt = PLANNER_MODES[mode].get("activation_checkpointing", False)
            batch = largest_batch(static, gpu_bytes, max_length, activation_checkpointing=ckpt, packing=packing)
            peak = combine(static, max(batch, 1), max_length, activation_checkpointing=ckpt, packing=packing).total
            row = PlanRow(name, mode, batch, peak, gpu_bytes - peak)
            if name == apollo.BASELINE:
                adamw[mode] = batch
        if name in chosen or name.startswith(f"{apollo.BASELINE}+"):  # the adapter rows were asked for by name
            rows.append(row)
    for row in rows:
        if row.batch is None:
            continue
        base = adamw.get(row.mode)
        if base is None:
            base, row.note = adamw.get("plain"), "ratio to AdamW plain (AdamW cannot run this mode)"
        row.ratio = row.batch / base if base else None
    return rows


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '24e9' -> 24e9 (bytes); a bare number under 10^4 is GB."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*(GB|GiB|MB|MiB|TB|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu_memory must look like 80GB or 80GiB, got {text!r}")
    value = float(match.group(1))
    unit = (match.group(2) or ("GB" if value < 1e4 else "B")).lower()
    return value * {"b": 1, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30, "tb": 1e12}[unit]


def format_plan(rows: list[PlanRow], gpu_bytes: float) -> list[str]:
    lines = [f"{'optimizer':<16}{'mode':<26}{'micro-batch':>12}{'peak GB':>10}{'headroom GB':>13}{'x AdamW':>9}"]
    for row in rows:
        if row.batch is None:
            lines.append(f"{row.optimizer:<16}{row.mode:<26}{'refused':>12}   ({row.note})")
            continue
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        note = f"  ({row.note})" if row.note else ""
        if row.batch == 0:
            lines.append(f"{row.optimizer:<16}{row.mode:<26}{0:>12}{row.peak / GB:>10.2f}{row.headroom / GB:>13.2f}"
                         f"{'-':>9}  (batch 1 does not fit){note}")
            continue
        lines.append(f"{row.optimizer:<16}{row.mode:<26}{row.batch:>12}{row.peak / GB:>10.2f}{row.headroom / GB:>13.2f}"
                     f"{ratio:>9}{note}")
    return lines
