"""Numbers only: apollo.fira.Fira against the published `fira` package (pip install fira), 10 steps in float64.

    python benchmarks/fira_parity.py [--steps 10] [--gap 4] [--alpha 0.25]

Both optimizers get the same weights and gradients (one wide and one tall low-rank matrix, one regular vector);
printed per step: the relative difference ||W_ours - W_package|| / ||W_package - W_0|| of each weight. The
package is used through its public interface only (param groups with rank / update_proj_gap / alpha /
proj_type, ``FiraAdamW``); nothing of its code is read or copied.
"""
from __future__ import annotations

import argparse

import torch

from apollo.fira import Fira

SHAPES = [(24, 40), (40, 24)]  # wide (left projection), tall (right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gap", type=int, default=4, help="update_proj_gap T (SVD refreshes at t = 0, T, ...)")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    args = parser.parse_args()
    try:
        from fira import FiraAdamW
    except ImportError:
        raise SystemExit("the published package is missing: pip install fira")

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] + [
        torch.randn(16, generator=gen, dtype=torch.float64)]
    bases = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights]
    grads = [[b + 0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in bases]
             for _ in range(args.steps)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    lowrank = {"rank": args.rank, "update_proj_gap": args.gap, "alpha": args.alpha, "proj_type": "std"}
    ours_opt = Fira([{"params": ours[:2], **lowrank}, {"params": ours[2:]}], lr=args.lr,
                    weight_decay=args.weight_decay)
    theirs_opt = FiraAdamW([{"params": theirs[:2], **lowrank}, {"params": theirs[2:]}], lr=args.lr,
                           weight_decay=args.weight_decay, no_deprecation_warning=True)
    print(f"steps {args.steps}, T {args.gap}, rank {args.rank}, alpha {args.alpha}, lr {args.lr}, "
          f"weight_decay {args.weight_decay}, float64")
    print("step  " + "  ".join(f"{'x'.join(map(str, w.shape)):>10}" for w in weights) + "  limited (ours)")
    for step, step_grads in enumerate(grads, start=1):
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        previous = [ours_opt.state[p].get("limiter_norm") for p in ours[:2]]
        ours_opt.step()
        theirs_opt.step()
        diffs = [((a - b).norm() / (b - w).norm()).item() for a, b, w in zip(ours, theirs, weights)]
        # a limited step stores gamma (p + 1e-8); an unlimited one the norm of S (below that)
        limited = ["-" if p is None else "yes" if torch.isclose(ours_opt.state[q]["limiter_norm"], 1.01 * (p + 1e-8),
                                                                  rtol=1e-12) else "no"
                   for p, q in zip(previous, ours[:2])]
        print(f"{step:4d}  " + "  ".join(f"{d:10.2e}" for d in diffs) + "  " + " ".join(limited))


if __name__ == "__main__":
    with torch.no_grad():
        main()
