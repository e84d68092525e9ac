"""Optimizer step time on the parameters of a LLaMA config, against baselines measured in the same run.

    python benchmarks/optimizer_step.py --models 60m 130m --dtypes float32 bfloat16 --steps 20
    python benchmarks/optimizer_step.py --models 130m --dtypes bfloat16 --rows apollo apollo_mini
    python benchmarks/optimizer_step.py --models 130m --dtypes float32 --rows apollo apollo_mini --cpu_chunk_elements 1048576
    python benchmarks/optimizer_step.py --models 130m --dtypes float32 bfloat16 --rows apollo fira scale adam_mini soap adamw8bit
    python benchmarks/muon_step.py --model 130m     # muon where its whole step takes minutes (a CPU's bf16 matmuls)
    python benchmarks/optimizer_step.py --models 130m --dtypes float32 --rows apollo apollo_mini galore --anchors

For each model and dtype it builds the model's parameters (random values) with random gradients and
prints a markdown table: median ms per step (>= --steps timed steps after warm-up, optimizers
interleaved round by round so that drift on a shared machine hits all alike), the step at a
projection refresh, optimizer-state MB, and ratios to torch AdamW (foreach and fused), to the
projection floor (the projection matmuls alone + drawing P + fused AdamW on the regular parameters),
and to the published apollo-torch / galore-torch packages when they are installed (their
`__init__` imports bitsandbytes, so their optimizer modules are loaded on their own).
`--anchors` adds other libraries' optimizers (heavyball's compiled AdamW, torchao's 8/4-bit AdamW,
pytorch-optimizer's APOLLO and GaLore; benchmarks/anchors.py says how to install them beside the
benchmark): each a ratio to torch's fused AdamW, with a note where it is not the reference algorithm,
or the reason it cannot run on this torch.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import apollo  # noqa: E402
from apollo import fused  # noqa: E402
from apollo.projection import projection_side, random_projection  # noqa: E402
import anchors  # noqa: E402  (benchmarks/ is on the path: run as a script, or by the tests)

RANKS = {"60m": 128, "130m": 192, "350m": 256, "1b": 256}  # PROTOCOL.md recipe ranks


def build_parameters(size: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The model's modules with random weights and random gradients (no forward pass needed)."""
    config = LlamaConfig.from_json_file(str(REPO / "configs" / f"llama_{size}.json"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu").to(dtype)  # the dtype first: a gradient must match its parameter's dtype
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(dtype)
    return model


@functools.cache
def _load_published(package: str, module: str, attribute: str):
    """An optimizer class from an installed published package, imported without its __init__ (bitsandbytes)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]
    if package not in sys.modules:
        shell = types.ModuleType(package)
        shell.__path__ = [root]
        sys.modules[package] = shell
    module_spec = importlib.util.spec_from_file_location(f"{package}.{module}", f"{root}/{module}.py")
    loaded = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = loaded
    try:
        module_spec.loader.exec_module(loaded)
    except Exception as error:  # a missing dependency of theirs: report and go on
        print(f"note: {package}.{module} not loadable ({error})", file=sys.stderr)
        return None
    return getattr(loaded, attribute)


def _registered(name: str, model, rank: int, gap: int, **extra):
    """A registered optimizer as `--optimizer NAME` builds it, at the benchmark's rank where its spec takes one
    (APOLLO-Mini keeps its preset's rank 1) and a refresh every `gap` updates where it has a refresh."""
    spec = apollo.get_spec(name)
    options = {"rank": rank} if "rank" in spec.smoke_options else {}
    if spec.refresh_option is not None:
        options[spec.refresh_option] = gap
    return lambda: apollo.build_optimizer(name, model, lr=1e-3, **options, **extra)


def optimizers(model, rank: int, gap: int):
    """name -> zero-argument factory. `gap` is the refresh interval (1 makes every step a refresh)."""
    groups = lambda **kw: apollo.param_groups(model, **kw)  # noqa: E731
    factories = {
        # --optimizer adamw builds torch.optim.AdamW with torch's defaults: the foreach path
        "torch adamw foreach": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
        "torch adamw fused": lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
    }
    for name in FUSED_ROWS:  # the fused step (apollo/fused.py) and, where it has one, the plain definition
        factories[name] = _registered(name, model, rank, gap)
        if "fused" in apollo.get_spec(name).options:
            factories[f"{name} (plain path)"] = _registered(name, model, rank, gap, fused=False)
    # the AdamW that APOLLO runs on its regular group, to set against torch's fused kernel on the same tensors
    factories["apollo regular group"] = lambda: apollo.APOLLO([groups()[0]], lr=1e-3)
    for name in PEER_ROWS:  # the rest of the registry (refresh column: Fira's SVD, SOAP's power step + QR, ...)
        factories[name] = _registered(name, model, rank, gap)
    published_apollo = _load_published("apollo_torch", "apollo", "AdamW")
    if published_apollo is not None:
        def make(**kw):
            return lambda: published_apollo(groups(proj="random", proj_type="std", update_proj_gap=gap, **kw), lr=1e-3,
                                            scale_front=kw.get("scale_type") == "tensor")
        factories["apollo-torch apollo"] = make(rank=rank, scale_type="channel", scale=1.0)
        factories["apollo-torch apollo_mini"] = make(rank=1, scale_type="tensor", scale=128.0)
    published_galore = _load_published("galore_torch", "adamw", "AdamW")
    if published_galore is not None:
        factories["galore-torch galore"] = lambda: published_galore(
            groups(rank=rank, update_proj_gap=gap, scale=0.25, proj_type="std"), lr=1e-3)
    return factories


def projection_floor(model, rank: int, dtype: torch.dtype) -> dict[str, float]:
    """Seconds of the unavoidable parts of an APOLLO step: projection matmuls, drawing P, fused AdamW on the rest."""
    regular, low_rank = apollo.param_groups(model, rank=rank)
    sides = [projection_side(p.shape, "std") for p in low_rank["params"]]
    projections = [random_projection(i, p.shape, rank, s, dtype=dtype) for i, (p, s) in enumerate(zip(low_rank["params"], sides))]

    def matmuls():  # as the fused step multiplies them (fused.projection_operands: bf16 in float32 on the CPU)
        for p, s, proj in zip(low_rank["params"], sides, projections):
            grad, proj = fused.projection_operands(p.grad, proj)
            _ = grad @ proj.T if s == "right" else proj.T @ grad

    def draws():
        for i, (p, s) in enumerate(zip(low_rank["params"], sides)):
            random_projection(i, p.shape, rank, s, dtype=dtype)

    regular_adamw = torch.optim.AdamW(regular["params"], lr=1e-3, fused=True)
    return {"matmuls": matmuls, "draw P": draws, "fused adamw (regular)": regular_adamw.step}


def time_rounds(callables: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved rounds: every callable runs once per round; returns seconds per call."""
    for fn in callables.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in callables}
    for _ in range(steps):
        for name, fn in callables.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def state_mb(optimizer) -> float:
    return apollo.optimizer_state_bytes(optimizer) / 2**20


BASELINES = ("torch adamw foreach", "torch adamw fused")
PUBLISHED = {"apollo": "apollo-torch apollo", "apollo_mini": "apollo-torch apollo_mini", "galore": "galore-torch galore"}
#: Every registered optimizer but the AdamW baseline (torch's, timed as its two rows), from the registry: the
#: specs whose low-rank groups take apollo/fused.py's step, then the rest whose packages are installed.
FUSED_ROWS = tuple(n for n in apollo.optimizer_names() if apollo.get_spec(n).fused_low_rank)
PEER_ROWS = tuple(n for n in apollo.optimizer_names()
                  if n != apollo.BASELINE and n not in FUSED_ROWS and apollo.get_spec(n).available)
ROWS = (tuple(row for n in FUSED_ROWS for row in (n, f"{n} (plain path)")[:1 + ("fused" in apollo.get_spec(n).options)])
        + ("apollo regular group",) + PEER_ROWS)


def selected(name: str, rows: Sequence[str]) -> bool:
    """Whether a factory's row is timed: the torch AdamW baselines always, a published package's row with
    its counterpart (plain path or not)."""
    if name in BASELINES or name in rows:
        return True
    return any(PUBLISHED.get(row.removesuffix(" (plain path)")) == name for row in rows)


def benchmark(size: str, dtype: torch.dtype, steps: int, refresh_steps: int, rows: Sequence[str] = ROWS,
              warmup: int = 2, anchor_rows: Sequence[str] = (), compiled_elementwise: bool = False) -> str:
    rank = RANKS[size]
    model = build_parameters(size, dtype)
    # normal steps: a gap far beyond the run, after the first (refresh) step in warm-up
    normal = {name: make() for name, make in optimizers(model, rank, gap=10**9).items() if selected(name, rows)}
    anchor_optimizers, anchor_failures = anchors.build_anchors(model, anchor_rows, rank, gap=10**9)
    normal.update(anchor_optimizers)
    steps_of = {name: optimizer.step for name, optimizer in normal.items()}
    if compiled_elementwise:  # the APOLLO-family fused rows again, built with their moments' update compiled
        for name in [n for n in normal if n in FUSED_ROWS]:
            normal[f"{name} [compiled]"] = _registered(name, model, rank, gap=10**9, elementwise="compiled")()
            steps_of[f"{name} [compiled]"] = normal[f"{name} [compiled]"].step
    snapshot = [p.detach().clone() for p in model.parameters()]
    floor_parts = projection_floor(model, rank, dtype)
    timed = time_rounds({**steps_of, **floor_parts}, steps, warmup=warmup)
    median_ms = {name: 1e3 * statistics.median(t) for name, t in timed.items()}
    floor_ms = sum(median_ms[k] for k in floor_parts)
    # refresh steps: every step redraws P (random) or recomputes the SVD
    refresh_names = [n for n in normal if n in FUSED_ROWS + PEER_ROWS and apollo.get_spec(n).refresh_option
                     or n in PUBLISHED.values()]
    refreshing = {name: make() for name, make in optimizers(model, rank, gap=1).items() if name in refresh_names}
    refresh_ms = {name: 1e3 * statistics.median(t)
                  for name, t in time_rounds({n: o.step for n, o in refreshing.items()}, refresh_steps, warmup=1).items()}
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)

    fused_ms = median_ms["torch adamw fused"]
    foreach = median_ms["torch adamw foreach"]
    lines = [
        f"### LLaMA-{size}, {str(dtype).removeprefix('torch.')}, rank {rank} ({steps} timed steps after {warmup}, median)",
        "",
        f"Projection floor: {floor_ms:.1f} ms = matmuls {median_ms['matmuls']:.1f} + draw P {median_ms['draw P']:.1f} "
        f"+ fused AdamW on regular parameters {median_ms['fused adamw (regular)']:.1f}.",
        "",
        "| optimizer | step ms | refresh step ms | state MB | / adamw fused | / adamw foreach | / floor | / published |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, optimizer in normal.items():
        ms = median_ms[name]
        ref = PUBLISHED.get(name.removesuffix(" (plain path)").removesuffix(" [compiled]"))
        vs_published = f"{ms / median_ms[ref]:.2f}" if ref in median_ms else "-"
        base = name.removesuffix(" (plain path)").removesuffix(" [compiled]")
        # the floor is APOLLO's (random or SVD P, channel or tensor scaling): the rows of the specs with its presets
        vs_floor = f"{ms / floor_ms:.2f}" if base in FUSED_ROWS and "proj" in apollo.PRESETS.get(base, {}) else "-"
        if name in anchors.NOTES:
            vs_floor = "-"
        if name == "apollo regular group":  # its baseline is the fused kernel on the same (regular) tensors
            vs_floor = f"{ms / median_ms['fused adamw (regular)']:.2f} of fused on regular"
        refresh = f"{refresh_ms[name]:.1f}" if name in refresh_ms else "-"
        state = "-" if name in anchors.NOTES else f"{state_mb(optimizer):.1f}"  # their states are not torch.optim's
        lines.append(f"| {name} | {ms:.1f} | {refresh} | {state} | {ms / fused_ms:.2f} | "
                     f"{ms / foreach:.2f} | {vs_floor} | {vs_published} |")
    for name, reason in anchor_failures.items():
        lines.append(f"| {name} | cannot run here: {reason} | - | - | - | - | - | - |")
    notes = [f"- {name}: {anchors.NOTES[name]}" for name in anchor_rows]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["60m", "130m"], choices=sorted(RANKS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (after warm-up)")
    parser.add_argument("--refresh_steps", type=int, default=3, help="timed refresh steps per optimizer (SVD is slow)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per optimizer before the timed ones (>= 1: the first step allocates the "
                             "state; 1 for rows whose step takes minutes on a CPU, e.g. muon's bfloat16 Newton-Schulz)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW",
                        help=f"optimizers to time (default: all of {', '.join(ROWS)}); torch's AdamW (foreach, fused) "
                             "and the published package of a chosen row are always timed with them")
    parser.add_argument("--anchors", nargs="*", default=None, choices=anchors.ANCHORS, metavar="ANCHOR",
                        help=f"other libraries' optimizers to time with the rows (no names: "
                             f"{', '.join(anchors.DEFAULT_ANCHORS)}; also {', '.join(set(anchors.ANCHORS) - set(anchors.DEFAULT_ANCHORS))})")
    parser.add_argument("--compiled_elementwise", action="store_true",
                        help="also time each chosen APOLLO/GaLore row with its moments' update compiled "
                             "(elementwise='compiled'), as '<row> [compiled]'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu_chunk_elements", type=int, default=None,
                        help="override apollo.fused.CPU_CHUNK_GRAD_ELEMENTS (gradient numbers per chunk on the CPU; "
                             f"default {fused.CPU_CHUNK_GRAD_ELEMENTS}) to tune it to another CPU's cache")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.refresh_steps < 1:
        parser.error("--warmup, --steps and --refresh_steps must be >= 1")
    if args.cpu_chunk_elements is not None:
        if args.cpu_chunk_elements < 1:
            parser.error("--cpu_chunk_elements must be >= 1")
        fused.CPU_CHUNK_GRAD_ELEMENTS = args.cpu_chunk_elements
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for size in args.models:
        for dtype in args.dtypes:
            anchor_rows = () if args.anchors is None else (args.anchors or anchors.DEFAULT_ANCHORS)
            print(benchmark(size, getattr(torch, dtype), args.steps, args.refresh_steps, args.rows,
                            args.warmup, anchor_rows, args.compiled_elementwise), flush=True)


if __name__ == "__main__":
    main()
