"""Where an APOLLO step's time goes: milliseconds per step in each phase of the fused step (apollo/fused.py).

    python benchmarks/optimizer_step_phases.py --model 130m --dtype float32 --steps 8

Builds the model's parameters with random gradients (as benchmarks/optimizer_step.py does), then times
`--steps` steps of APOLLO (rank of the recipe) and APOLLO-Mini with the phases' functions wrapped in
timers: drawing P, G's norms, the projection matmuls, the low-rank moments, the scaling factors, and the
rest of the update (limiter, weight update, decay), plus torch's fused AdamW on the regular parameters.
The wrappers add a few microseconds per call; the step total is measured with them in place.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import apollo  # noqa: E402
import apollo.fused as fused  # noqa: E402
import apollo.optimizer as optimizer_module  # noqa: E402
from optimizer_step import RANKS, build_parameters  # noqa: E402

# The functions timed (inclusive); phase_ms subtracts nested ones to give each phase's own time.
TIMED = [
    (optimizer_module, "random_projection"),  # draw P
    (fused, "_project"),  # the projection matmuls (split over the threads at rank 1 on the CPU)
    (fused, "_project_chunk"),  # G's norms + the matmuls
    (fused, "_low_rank_directions"),  # moments, M / (sqrt(V) + eps)
    (fused, "_scaling"),  # channel / tensor factors, ||s * G||
    (fused, "apollo_updates"),  # all the above but P + limiter, weight update, decay
    (fused, "fused_adamw"),  # torch's fused AdamW on the regular parameters
]


def _timed(function, seconds: dict, name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
    return wrapper


def phase_ms(optimizer, steps: int) -> dict[str, float]:
    """Milliseconds per step by phase (exclusive), plus 'step' (the whole step) and 'other' (bookkeeping)."""
    seconds: dict[str, float] = collections.defaultdict(float)
    originals = [(module, name, getattr(module, name)) for module, name in TIMED]
    for module, name, original in originals:
        setattr(module, name, _timed(original, seconds, name))
    try:
        optimizer.step()  # warm-up (and the first, refreshing, step)
        seconds.clear()
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        total = time.perf_counter() - start
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    inclusive = {name: value * 1e3 / steps for name, value in seconds.items()}
    get = lambda name: inclusive.get(name, 0.0)  # noqa: E731
    exclusive = {
        "draw P": get("random_projection"),
        "projection matmuls": get("_project"),
        "G's norms": get("_project_chunk") - get("_project"),
        "moments and direction": get("_low_rank_directions"),
        "scaling factors": get("_scaling"),
        "limiter, weight update, decay": get("apollo_updates") - get("_project_chunk") - get("_low_rank_directions")
        - get("_scaling"),
        "fused AdamW (regular)": get("fused_adamw"),
    }
    exclusive["other (bookkeeping)"] = total * 1e3 / steps - sum(exclusive.values())
    exclusive["step"] = total * 1e3 / steps
    return exclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="130m", choices=sorted(RANKS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_parameters(args.model, getattr(torch, args.dtype))
    rank = RANKS[args.model]
    groups = lambda **kw: apollo.param_groups(model, update_proj_gap=10**9, **kw)  # noqa: E731
    runs = {
        f"apollo (rank {rank})": apollo.APOLLO(groups(rank=rank), lr=1e-3),
        "apollo_mini": apollo.APOLLO(groups(rank=1, scale_type="tensor", scale=128.0), lr=1e-3),
    }
    print(f"LLaMA-{args.model}, {args.dtype}, {args.steps} steps, ms per step (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    results = {name: phase_ms(optimizer, args.steps) for name, optimizer in runs.items()}
    names = list(results)
    print("| phase | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for phase in results[names[0]]:
        print(f"| {phase} | " + " | ".join(f"{results[n][phase]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
