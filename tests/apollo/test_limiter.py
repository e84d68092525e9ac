"""Norm-growth limiter: ||S_t|| <= gamma ||S_{t-1}|| always; scale_front changes nothing but round-off."""
import math

import torch

import apollo
from apollo.functional import bias_corrected_step_size


def _applied_updates(limiter: bool, scale_front: bool = False, steps: int = 6, gamma: float = 1.01):
    """Run APOLLO on one weight with gradients that grow 10x per step; return each step's S_t (before k_t)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    opt = apollo.APOLLO(
        [{"params": [p], "rank": 2, "scale": 4.0, "scale_front": scale_front,
          "norm_growth_limiter": limiter, "norm_growth_gamma": gamma}],
        lr=0.01,
    )
    g = torch.Generator().manual_seed(1)
    updates = []
    for t in range(1, steps + 1):
        before = p.detach().clone()
        p.grad = torch.randn(16, 8, generator=g, dtype=torch.float64) * 10.0**t
        opt.step()
        updates.append((before - p.detach()) / bias_corrected_step_size(0.01, 0.9, 0.999, t))
    return updates


def test_update_norm_grows_at_most_gamma_per_step():
    norms = [u.norm().item() for u in _applied_updates(limiter=True)]
    for previous, current in zip(norms, norms[1:]):
        assert current <= 1.01 * previous * (1 + 1e-9)
    # the limiter really engaged: it held growth to exactly gamma while the gradient grew 10x
    assert math.isclose(norms[-1] / norms[-2], 1.01, rel_tol=1e-6)


def test_without_limiter_the_norm_grows_faster_than_gamma():
    # APOLLO's scaling already normalises most of the 10x growth; what is left (~1.16x) exceeds both gammas used here
    norms = [u.norm().item() for u in _applied_updates(limiter=False)]
    assert norms[-1] / norms[-2] > 1.1


def test_limiter_gamma_is_respected():
    norms = [u.norm().item() for u in _applied_updates(limiter=True, gamma=1.05)]
    assert math.isclose(norms[-1] / norms[-2], 1.05, rel_tol=1e-6)


def test_scale_front_matches_scale_back():
    front = _applied_updates(limiter=True, scale_front=True)
    back = _applied_updates(limiter=True, scale_front=False)
    for a, b in zip(front, back):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=0)


def test_a_zero_previous_norm_means_no_limit_yet():
    """growth_limit: p = 0 (an all-zero gradient's step) gives l = 1; p > 0 is the published formula, to the bit."""
    from apollo.functional import NORM_EPS, growth_limit
    norms = torch.tensor([3.0, 3.0, 0.5, 2.0])
    previous = torch.tensor([0.0, 1.0, 1.0, 1e-3])
    limits = growth_limit(norms, previous, 1.01)
    published = torch.clamp(norms / (previous + NORM_EPS), min=1.01) / 1.01
    assert limits[0].item() == 1.0
    assert torch.equal(limits[1:], published[1:])
    assert math.isclose(limits[1].item(), 3.0 / (1.0 + 1e-8) / 1.01, rel_tol=1e-6)


def test_zero_gradient_step_then_full_size_updates_plain_and_fused():
    """After a zero-gradient step the next update has the size it has without it (the limiter is not armed
    at 0), on the plain and on the fused path alike; its norm is then stored."""
    sizes = {}
    for fused in (False, True):
        for zero_first in (False, True):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
            opt = apollo.APOLLO([{"params": [p], "rank": 2}], lr=0.01, fused=fused)
            if zero_first:
                p.grad = torch.zeros_like(p)
                opt.step()
                assert opt.state[p]["limiter_norm"].item() == 0.0
            p.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            before = p.detach().clone()
            opt.step()
            sizes[fused, zero_first] = (p.detach() - before).norm().item()
            assert opt.state[p]["limiter_norm"].item() > 0.0
    for fused in (False, True):
        # same size up to Adam's bias correction at t = 2 instead of t = 1 (the zero step counted)
        ratio = sizes[fused, True] / sizes[fused, False]
        assert 0.5 < ratio < 2.0, ratio
