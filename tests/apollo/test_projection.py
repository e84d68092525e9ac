"""Projections: refresh schedule, determinism, identical P across instances ("ranks"), SVD orthonormality."""
import pytest
import torch

import apollo
from apollo.projection import advance_seed, project, projection_side, random_projection, svd_projection


def _model_and_grads(seed=0, steps=8):
    torch.manual_seed(seed)
    weights = [torch.randn(12, 6), torch.randn(6, 12)]
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(steps)]
    return weights, grads


def _projections_per_step(gap=3, steps=8, store=True, proj="random"):
    weights, grads = _model_and_grads(steps=steps)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = apollo.APOLLO([{"params": params, "rank": 2, "update_proj_gap": gap, "proj": proj}],
                        lr=0.01, store_projection=store)
    seen = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        seen.append([(opt.state[p].get("projection"), opt.state[p].get("proj_seed")) for p in params])
    return seen, opt, params


def test_projection_redrawn_exactly_at_steps_1_T_plus_1_2T_plus_1():
    seen, _, _ = _projections_per_step(gap=3, steps=8)
    changed_at = [t + 1 for t in range(1, 8) if not torch.equal(seen[t][0][0], seen[t - 1][0][0])]
    assert changed_at == [4, 7]
    # the seeds follow: position 1 first, then advanced once per redraw
    seeds = [s[0][1] for s in seen]
    assert seeds[0] == 1 and seeds[3] == advance_seed(1) and seeds[6] == advance_seed(advance_seed(1))


def test_stored_and_regenerated_projection_give_identical_runs():
    _, _, stored = _projections_per_step(store=True)
    _, opt, regenerated = _projections_per_step(store=False)
    assert all("projection" not in opt.state[p] for p in regenerated)
    for a, b in zip(stored, regenerated):
        assert torch.equal(a, b)


def test_moments_are_not_reset_at_a_refresh():
    """At step T+1: M = b1 * M_T + (1 - b1) * R_{T+1} with R from the *new* P."""
    weights, grads = _model_and_grads(steps=4)
    p = torch.nn.Parameter(weights[0].clone())
    opt = apollo.APOLLO([{"params": [p], "rank": 2, "update_proj_gap": 3}], lr=0.01, betas=(0.9, 0.999))
    for t in range(3):
        p.grad = grads[t][0].clone()
        opt.step()
    m_before = opt.state[p]["exp_avg"].clone()
    p.grad = grads[3][0].clone()
    opt.step()
    new_p = random_projection(opt.state[p]["proj_seed"], p.shape, 2, "right")
    expected = 0.9 * m_before + 0.1 * project(grads[3][0], new_p, "right")
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected)
    assert m_before.abs().sum() > 0


def test_two_instances_draw_the_same_projection_like_data_parallel_ranks():
    _, opt_a, params_a = _projections_per_step(store=True)
    _, opt_b, params_b = _projections_per_step(store=True)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(opt_a.state[pa]["projection"], opt_b.state[pb]["projection"])
        assert torch.equal(pa, pb)


def test_random_projection_statistics_and_dtype():
    proj = random_projection(7, (4096, 512), 64, "right")
    assert proj.shape == (64, 512)
    assert abs(proj.var().item() - 1 / 64) < 0.02 / 64
    bf16 = random_projection(7, (4096, 512), 64, "right", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, proj.to(torch.bfloat16))


@pytest.mark.parametrize("shape,proj_type,side", [
    ((8, 4), "std", "right"), ((4, 8), "std", "left"), ((8, 8), "std", "right"),
    ((8, 4), "reverse_std", "left"), ((4, 8), "reverse_std", "right"), ((4, 8), "right", "right"), ((8, 4), "left", "left"),
])
def test_projection_side(shape, proj_type, side):
    assert projection_side(shape, proj_type) == side


@pytest.mark.parametrize("side", ["right", "left"])
def test_svd_projection_is_orthonormal(side):
    torch.manual_seed(0)
    grad = torch.randn(20, 12)
    proj = svd_projection(grad, 5, side)
    gram = proj @ proj.T if side == "right" else proj.T @ proj
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(16, 6), (6, 16)])
def test_galore_update_lies_in_the_subspace(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = apollo.GaLore([{"params": [p], "rank": 2, "update_proj_gap": 100}], lr=0.1)
    before = p.detach().clone()
    p.grad = torch.randn(shape, dtype=torch.float64)
    opt.step()
    delta = p.detach() - before
    proj = opt.state[p]["projection"]
    side = projection_side(shape, "std")
    # the part of the update outside span(P) is zero
    if side == "right":
        outside = delta - delta @ proj.T @ proj
    else:
        outside = delta - proj @ proj.T @ delta
    assert delta.norm() > 1e-3
    assert outside.norm() < 1e-6 * delta.norm()
    assert torch.linalg.matrix_rank(delta).item() == 2


def test_initial_seed_lets_per_parameter_optimizers_draw_the_model_wide_projections():
    """One optimizer per weight (layer-wise) with initial_seed = global position reproduces the joint run."""
    weights, grads = _model_and_grads(steps=5)
    joint = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = apollo.APOLLO([{"params": joint, "rank": 2, "update_proj_gap": 2}], lr=0.01)
    alone = [torch.nn.Parameter(w.clone()) for w in weights]
    opts = [apollo.APOLLO([{"params": [p], "rank": 2, "update_proj_gap": 2, "initial_seed": i + 1}], lr=0.01)
            for i, p in enumerate(alone)]
    for step_grads in grads:
        for p, q, g in zip(joint, alone, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
    for a, b in zip(joint, alone):
        assert torch.equal(a, b)
