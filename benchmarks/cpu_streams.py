"""What one pass over gradient-sized tensors costs on this machine: the figures behind the fused step's design.

    python benchmarks/cpu_streams.py                       # 60 float32 matrices of 2048 x 768 (377 MB each set)
    python benchmarks/cpu_streams.py --shape 768 2048 --count 40 --threads 1

Every row is a median over --rounds passes over --count fresh matrices (more than the caches hold, so
every pass reads from memory), with the bytes it must move and the rate that makes:

- read-only reductions (torch.sum, BLAS's dot): what ||G|| costs;
- read + write streams (W *= 1, W += a G, torch's fused AdamW): what a weight update costs;
- the rank-1 projection as torch multiplies it (BLAS's matrix-vector product) and split into one block of
  rows per thread (`apollo.fused._project`), right (G p) and left (p^T G on the transposed shape).

APOLLO-Mini's step reads G once for its norm, once (from cache) for its projection and once (from cache) for
the update of W; AdamW streams G, W and both moments. Which of them is faster depends on how these rates
compare here, so read the table before reading a step-time ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apollo import fused  # noqa: E402


def median_seconds(function, rounds: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows(shape: tuple[int, int], count: int, rounds: int) -> list[tuple[str, float, float]]:
    """(name, ms per pass, MB moved per pass) for each operation over `count` matrices of `shape`."""
    generator = torch.Generator().manual_seed(0)
    draw = lambda s: torch.randn(s, generator=generator)  # noqa: E731
    grads, weights = [draw(shape) for _ in range(count)], [draw(shape) for _ in range(count)]
    moments = [torch.zeros(shape) for _ in range(count)], [torch.zeros(shape) for _ in range(count)]
    steps = [torch.tensor(1.0)] * count
    m, n = shape
    right = [draw((1, n)) for _ in range(count)]  # G p
    transposed = [g.view(n, m) for g in grads]  # the same memory read as an n x m matrix: p^T G
    left = [draw((n, 1)) for _ in range(count)]
    mb = count * m * n * 4 / 1e6  # one float32 pass over the matrices

    def adamw():
        torch._fused_adamw_(weights, grads, *moments, [], steps, lr=1e-12, beta1=0.9, beta2=0.999,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

    operations = {
        "read: sum(G)": (lambda: [g.sum() for g in grads], 1),
        "read: dot(G, G) (BLAS)": (lambda: [torch.dot(g.view(-1), g.view(-1)) for g in grads], 1),
        "read + write: W *= 1": (lambda: [w.mul_(1.0) for w in weights], 2),
        "read + write: W += a G": (lambda: [w.add_(g, alpha=1e-12) for w, g in zip(weights, grads)], 3),
        "read + write: torch fused AdamW": (adamw, 7),
        "rank-1 right, torch (G p)": (lambda: [g @ p.T for g, p in zip(grads, right)], 1),
        "rank-1 right, split (fused._project)": (lambda: [fused._project(g, p, "right") for g, p in zip(grads, right)], 1),
        "rank-1 left, torch (p^T G)": (lambda: [p.T @ g for g, p in zip(transposed, left)], 1),
        "rank-1 left, split (fused._project)": (lambda: [fused._project(g, p, "left") for g, p in zip(transposed, left)], 1),
    }
    return [(name, 1e3 * median_seconds(function, rounds), passes * mb)
            for name, (function, passes) in operations.items()]


def table(results: list[tuple[str, float, float]]) -> str:
    lines = ["| operation | ms | MB moved | GB/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {mb:.0f} | {mb / ms:.1f} |" for name, ms, mb in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[2048, 768], metavar=("M", "N"))
    parser.add_argument("--count", type=int, default=60, help="matrices per pass (default 60: 377 MB at 2048 x 768)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or args.count < 1 or args.rounds < 1:
        parser.error("--shape, --count and --rounds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.count} float32 matrices of "
          f"{args.shape[0]} x {args.shape[1]}, median of {args.rounds} passes\n")
    print(table(rows(tuple(args.shape), args.count, args.rounds)))


if __name__ == "__main__":
    main()
