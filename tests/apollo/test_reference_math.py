"""APOLLO, APOLLO-SVD, GaLore and the regular-group AdamW against the float64 re-derivation in reference.py.

Parameters are float64, so the only differences left are the order of floating-point operations.
Shapes cover tall, wide and square matrices; every proj_type; refreshes every 2 steps.
"""
import pytest
import torch

import apollo
from tests.apollo.reference import ReferenceAdamW, ReferenceLowRank

SHAPES = [(12, 6), (6, 12), (8, 8)]
STEPS = 5
LR, WD, BETAS = 0.02, 0.1, (0.9, 0.95)


def _grads(shapes, steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    # growing gradients so that the norm-growth limiter engages on some steps
    return [[torch.randn(s, generator=g, dtype=torch.float64) * (1.5**t) for s in shapes] for t in range(steps)]


def _run(optimizer_class, regular, low_rank, lowrank_options, grads_regular, grads_low_rank):
    reg = [torch.nn.Parameter(w.clone()) for w in regular]
    lr_params = [torch.nn.Parameter(w.clone()) for w in low_rank]
    opt = optimizer_class(
        [{"params": reg}, {"params": lr_params, **lowrank_options}], lr=LR, betas=BETAS, weight_decay=WD
    )
    for g_reg, g_low in zip(grads_regular, grads_low_rank):
        for p, g in zip(reg + lr_params, g_reg + g_low):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in reg], [p.detach() for p in lr_params]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize(
    "method,proj,scale_type,scale,scale_front",
    [
        ("apollo", "random", "channel", 2.0, False),
        ("apollo", "random", "tensor", 128.0, True),
        ("apollo", "random", "tensor", 128.0, False),
        ("apollo", "svd", "channel", 1.0, False),
        ("galore", "svd", None, 0.25, False),
    ],
)
def test_low_rank_steps_match_float64_reference(proj_type, method, proj, scale_type, scale, scale_front):
    torch.manual_seed(0)
    regular = [torch.randn(5, dtype=torch.float64)]
    low_rank = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    rank = 1 if scale_type == "tensor" else 3
    grads_reg = _grads([(5,)], STEPS, seed=4)
    grads_low = _grads(SHAPES, STEPS)

    if method == "galore":
        options = dict(rank=rank, proj_type=proj_type, update_proj_gap=2, scale=scale)
        ours_reg, ours_low = _run(apollo.GaLore, regular, low_rank, options, grads_reg, grads_low)
    else:
        options = dict(rank=rank, proj=proj, proj_type=proj_type, scale_type=scale_type, scale=scale,
                       scale_front=scale_front, update_proj_gap=2)
        ours_reg, ours_low = _run(apollo.APOLLO, regular, low_rank, options, grads_reg, grads_low)

    for index, (w0, w) in enumerate(zip(low_rank, ours_low)):
        # seeds are 1-based positions over all groups: the regular parameter is 1, low-rank ones 2, 3, 4
        ref = ReferenceLowRank(
            w0, method=method, seed=2 + index, rank=rank, proj=proj, proj_type=proj_type,
            scale_type=scale_type, scale=scale, gap=2, lr=LR, betas=BETAS, weight_decay=WD,
            scale_front=scale_front,
        )
        for t in range(STEPS):
            expected = ref.step(grads_low[t][index])
        torch.testing.assert_close(w, expected, rtol=1e-11, atol=1e-13)
        assert not torch.allclose(w, w0), "the weight did not move"

    ref_reg = ReferenceAdamW(regular[0], lr=LR, betas=BETAS, weight_decay=WD)
    for t in range(STEPS):
        expected = ref_reg.step(grads_reg[t][0])
    torch.testing.assert_close(ours_reg[0], expected, rtol=1e-12, atol=1e-14)


def test_single_apollo_step_closed_form():
    """One step with zero moments: M = (1-b1)R, V = (1-b2)R^2, so R~ = sign(R)*(1-b1)/sqrt(1-b2) (eps aside).

    With tensor scaling, s = ||R~|| / ||R|| and k_1 = lr * sqrt(1-b2)/(1-b1): W1 = W0 - lr * G * sqrt(numel(R)) / (||R|| + 1e-8).
    """
    torch.manual_seed(1)
    w0 = torch.randn(10, 4, dtype=torch.float64)
    grad = torch.randn(10, 4, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = apollo.APOLLO([{"params": [p], "rank": 2, "scale_type": "tensor"}], lr=0.1, eps=0.0)
    p.grad = grad
    opt.step()
    # right projection (10 >= 4): P is (2, 4), drawn from seed 1
    gen = torch.Generator().manual_seed(1)
    proj = (torch.randn(2, 4, generator=gen) / 2**0.5).double()
    r = grad @ proj.T
    expected = w0 - 0.1 * grad * (r.numel() ** 0.5) / (torch.linalg.norm(r) + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_adamw_group_is_the_spec_not_torch_adamw():
    """The spec puts eps on the uncorrected sqrt(v); torch.optim.AdamW on the corrected one. With a large eps they differ."""
    torch.manual_seed(2)
    w0, grad = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64) * 1e-3
    ours = torch.nn.Parameter(w0.clone())
    torch_p = torch.nn.Parameter(w0.clone())
    opt = apollo.APOLLO([ours], lr=0.1, eps=1e-3)
    torch_opt = torch.optim.AdamW([torch_p], lr=0.1, eps=1e-3, weight_decay=0.0)
    ours.grad, torch_p.grad = grad.clone(), grad.clone()
    opt.step()
    torch_opt.step()
    ref = ReferenceAdamW(w0, lr=0.1, eps=1e-3)
    torch.testing.assert_close(ours.detach(), ref.step(grad), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours.detach(), torch_p.detach(), rtol=1e-6, atol=0)
