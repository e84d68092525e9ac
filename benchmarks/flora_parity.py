"""Numbers only: apollo.flora.Flora against the published `flora-opt` 0.0.3 torch Flora, 10 steps in float64.

    pip install --no-deps flora-opt==0.0.3     # it imports bitsandbytes and accelerate at top level
    python benchmarks/flora_parity.py [--steps 10] [--kappa 3] [--rank 4] [--seed 0]

Both optimizers get the same float64 weights and gradients: a wide and a tall compressible matrix (left and
right projections), one with aspect ratio > 4 and one with min(m, n) < r (full momenta), and a vector;
κ = 3 moves the compressed momenta to new subspaces at steps 3, 6 and 9. Printed per step: the relative
difference ||W_ours - W_package|| / ||W_package - W_0|| of each weight, and at the end the largest over all
steps and weights. The package is used through its public constructor only (PEERS.md's parity settings);
nothing of its code is read or copied.
"""
from __future__ import annotations

import argparse

import torch

from apollo.flora import Flora

SHAPES = [(24, 40), (40, 24), (8, 48), (3, 20), (16,)]  # wide, tall, ratio 6, min < r, vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kappa", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from flora_opt.optimizers.torch.flora import Flora as Published
    except ImportError as error:
        raise SystemExit(f"the published package is missing ({error}): pip install --no-deps flora-opt==0.0.3 "
                         f"(needs bitsandbytes and accelerate)")

    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    bases = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights]
    grads = [[b + 0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in bases]
             for _ in range(args.steps)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    ours_opt = Flora(ours, lr=args.lr, weight_decay=args.weight_decay, rank=args.rank, update_proj_gap=args.kappa,
                     betas=(0.9, 0.8), eps=1e-30, eps2=1e-3, clip_threshold=1.0, seed=args.seed)
    theirs_opt = Published(theirs, lr=args.lr, rank=args.rank, kappa=args.kappa, beta1=0.9, eps=(1e-30, 1e-3),
                           clip_threshold=1.0, decay_rate=-0.8, weight_decay=args.weight_decay, scale_parameter=True,
                           relative_step=False, warmup_init=False, factorize_second_moment=True, seed=args.seed,
                           quantization=False)
    print(f"steps {args.steps}, kappa {args.kappa}, rank {args.rank}, lr {args.lr}, weight_decay "
          f"{args.weight_decay}, seed {args.seed}, float64")
    print("step  " + "  ".join(f"{'x'.join(map(str, w.shape)):>10}" for w in weights))
    worst = 0.0
    for step, step_grads in enumerate(grads, start=1):
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours_opt.step()
        theirs_opt.step()
        diffs = [((a - b).norm() / (b - w).norm()).item() for a, b, w in zip(ours, theirs, weights)]
        worst = max(worst, *diffs)
        print(f"{step:4d}  " + "  ".join(f"{d:10.2e}" for d in diffs))
    print(f"max relative difference over {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
