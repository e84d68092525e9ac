"""Muon's step time on a LLaMA config, from one torch.optim.Muon step per distinct matrix shape.

    python benchmarks/muon_step.py --model 130m --threads 1

Where a whole Muon step takes too long to time (on a CPU without fast bfloat16 matmuls torch's
Newton-Schulz, which casts G to bfloat16 whatever the weight's dtype, makes one 130M step last
minutes), this times `torch.optim.Muon.step()` once per distinct shape of the matrices that
`apollo.muon.param_groups` gives Muon (after one untimed step that allocates the momentum) and sums
time x count: the Muon part of a step. The AdamW part (torch's AdamW on embeddings, head and norms)
and torch's fused AdamW on the whole model are timed in the same run, so the printed ratio is
(Muon part + AdamW part) / fused AdamW. Shapes are timed alone, so the sum is an estimate of the
step, not a measurement of it; `benchmarks/optimizer_step.py --rows muon` measures the step itself.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from apollo import muon  # noqa: E402
from optimizer_step import RANKS, build_parameters, time_rounds  # noqa: E402


def seconds(step, repeats: int) -> float:
    """Median seconds of `step()` over `repeats` calls, after one untimed call (optimizer_step.time_rounds)."""
    return statistics.median(time_rounds({"step": step}, repeats, warmup=1)["step"])


def shape_counts(model: torch.nn.Module) -> collections.Counter:
    """How many of the matrices that Muon updates (apollo.muon.param_groups) have each shape."""
    matrices, _ = muon.param_groups(model)
    return collections.Counter(tuple(p.shape) for p in matrices)


def time_shapes(model: torch.nn.Module, repeats: int) -> dict[tuple[int, ...], float]:
    """Seconds of one torch.optim.Muon step on one matrix of each shape Muon updates (median of `repeats`)."""
    matrices, _ = muon.param_groups(model)
    out = {}
    for shape in sorted(shape_counts(model)):
        weight = next(p for p in matrices if tuple(p.shape) == shape)
        out[shape] = seconds(torch.optim.Muon([weight], lr=1e-3).step, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="130m", choices=sorted(RANKS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per shape (median)")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    model = build_parameters(args.model, getattr(torch, args.dtype))
    matrices, others = muon.param_groups(model)
    counts = shape_counts(model)
    fused = seconds(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True).step, 3)
    adamw_part = seconds(torch.optim.AdamW(others, lr=1e-3).step, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LLaMA-{args.model} {args.dtype}: "
          f"{len(matrices)} Muon matrices, {len(others)} AdamW tensors")
    print(f"torch adamw fused, whole model: {1e3 * fused:.1f} ms; AdamW part (torch AdamW on the rest): "
          f"{1e3 * adamw_part:.1f} ms\n")
    print("| matrix shape | count | torch Muon step s (one matrix) | s x count |", "|---|---|---|---|", sep="\n")
    total = 0.0
    for shape, s in time_shapes(model, args.repeats).items():
        total += s * counts[shape]
        print(f"| {shape[0]} x {shape[1]} | {counts[shape]} | {s:.2f} | {s * counts[shape]:.1f} |", flush=True)
    step_s = total + adamw_part
    print(f"\nMuon step, estimated from the shapes: {step_s:.1f} s = Muon part {total:.1f} + AdamW part "
          f"{adamw_part:.3f}; {step_s / fused:,.0f} x torch's fused AdamW on the whole model")


if __name__ == "__main__":
    main()
