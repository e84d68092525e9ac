"""Numbers only: apollo.galore8bit.GaLoreAdamW8bit against the published galore-torch 1.0 `GaLoreAdamW8bit`, float32.

    pip install --no-deps galore-torch==1.0     # needs bitsandbytes (installed with pip install -e .[bnb])
    python benchmarks/galore8bit_parity.py [--steps 10] [--gap 3] [--rank 16] [--seed 0]

Both optimizers get the same float32 weights and gradients (bitsandbytes quantises 16/32-bit floats only): a wide
and a tall low-rank matrix whose projected gradients are 8-bit states (left and right projections, rank r), a tall
one whose projected gradient has fewer than 4096 numbers (float32 states), and two regular tensors (an 8-bit
matrix, a float32-state vector). T = 3 refreshes P at steps 1, 4, 7, 10. Printed per step: the largest absolute
difference |W_ours - W_package| of each weight, and at the end the largest over all steps and weights (0 means
bit-identical). PEERS.md's parity settings: ``GaLoreAdamW8bit([{"params": regular}, {"params": lowrank, "rank": r,
"update_proj_gap": T, "scale": alpha, "proj_type": "std"}], lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)``.

Two runtime workarounds, applied here and never to the package's files (PEERS.md, "Pitfalls"): on a CPU build
``torch.cuda.synchronize`` (called after every parameter's update) is replaced by a no-op while the package
steps; with bitsandbytes >= 0.50 the package's positional arguments land as max_unorm = 100 and skip_zeros = True,
so ``opt.args.max_unorm = 0.0; opt.args.skip_zeros = False`` is set after construction (without it the float32-
state low-rank weight would get a zero update). The package is used through its public constructor only;
nothing of its code is read or copied.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from apollo.galore8bit import GaLoreAdamW8bit

# (shape, low-rank?): wide (left, R r x 300), tall (right, R 300 x r), tall with R under 4096 numbers at r <= 16,
# a regular 8-bit matrix and a regular float32-state vector
SHAPES = [((64, 300), True), ((300, 64), True), ((200, 24), True), ((64, 96), False), ((32,), False)]


@contextlib.contextmanager
def _no_cuda_synchronize():
    """The package calls torch.cuda.synchronize() after each update: a no-op on a CPU-only build, for its step only."""
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gap", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep_package_args", action="store_true",
                        help="leave the package's max_unorm/skip_zeros as bitsandbytes >= 0.50 reads them")
    args = parser.parse_args()
    try:
        from galore_torch import GaLoreAdamW8bit as Published
    except ImportError as error:
        raise SystemExit(f"the published package is missing ({error}): pip install --no-deps galore-torch==1.0 "
                         f"(needs bitsandbytes)")

    gen = torch.Generator().manual_seed(args.seed)
    weights = [torch.randn(shape, generator=gen) for shape, _ in SHAPES]
    bases = [torch.randn(w.shape, generator=gen) for w in weights]
    grads = [[b + 0.5 * torch.randn(b.shape, generator=gen) for b in bases] for _ in range(args.steps)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]

    def groups(params):
        low = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale, "proj_type": "std"}
        return [{"params": [p for p, (_, lr_) in zip(params, SHAPES) if not lr_]},
                {"params": [p for p, (_, lr_) in zip(params, SHAPES) if lr_], **low}]

    settings = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    ours_opt = GaLoreAdamW8bit(groups(ours), **settings)
    theirs_opt = Published(groups(theirs), **settings)
    if not args.keep_package_args:
        theirs_opt.args.max_unorm, theirs_opt.args.skip_zeros = 0.0, False
    print(f"steps {args.steps}, T {args.gap}, rank {args.rank}, scale {args.scale}, lr {args.lr}, weight_decay "
          f"{args.weight_decay}, seed {args.seed}, float32; package max_unorm {theirs_opt.args.max_unorm}, "
          f"skip_zeros {theirs_opt.args.skip_zeros}")
    print("step  " + "  ".join(f"{'x'.join(map(str, w.shape)) + ('*' if low else ''):>10}"
                               for w, (_, low) in zip(weights, SHAPES)) + "   (* low-rank)")
    worst = 0.0
    for step, step_grads in enumerate(grads, start=1):
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours_opt.step()
        with _no_cuda_synchronize():
            theirs_opt.step()
        diffs = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
        worst = max(worst, *diffs)
        print(f"{step:4d}  " + "  ".join(f"{d:10.2e}" for d in diffs))
    moved = max((b - w).abs().max().item() for b, w in zip(theirs, weights))
    print(f"max absolute difference over {args.steps} steps: {worst:.2e} (largest move of a weight: {moved:.2e})")


if __name__ == "__main__":
    with torch.no_grad():
        main()
