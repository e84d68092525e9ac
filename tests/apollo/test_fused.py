"""The fused step (apollo/fused.py, the default) against the plain one-tensor-at-a-time path (fused=False).

Tolerances verified here: float32 weights differ by at most 4 float32 ulps of the weights' norm,
||W_fused - W_plain|| <= 4 eps ||W_plain|| (measured: at most 1.3 eps after 7 steps; the updates are
10^5 times larger); the low-rank moments and the limiter's norms are bit-identical / within 2e-6;
GaLore's low-rank weights are bit-identical. In bfloat16 the fused path is at least as close to
the float64 result as the plain path. The float64 reference tests (test_reference_math.py) run on the fused path too.
"""
import pytest
import torch

import apollo
from apollo import fused

SHAPES = [(24, 10), (10, 24), (16, 16), (24, 10)]  # tall (right projection), wide (left), square; two of one shape

CONFIGS = {
    "apollo channel": (apollo.APOLLO, {"rank": 3}),
    "apollo tensor, scale_front": (apollo.APOLLO, {"rank": 1, "scale_type": "tensor", "scale": 128.0, "scale_front": True}),
    "apollo no limiter": (apollo.APOLLO, {"rank": 3, "norm_growth_limiter": False, "scale": 4.0}),
    "apollo svd": (apollo.APOLLO, {"rank": 3, "proj": "svd"}),
    "galore": (apollo.GaLore, {"rank": 3}),
}


def _params(dtype, values):
    """Random weights rounded to `values` (a dtype) and held in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    draw = lambda shape: torch.randn(shape, generator=generator).to(values).to(dtype)  # noqa: E731
    matrices = [torch.nn.Parameter(draw(shape)) for shape in SHAPES]
    regular = [torch.nn.Parameter(draw(n)) for n in (7, 24)]
    return regular, matrices


def _run(cls, lowrank, dtype, fused_path, steps=7, weight_decay=0.1, lr=0.02, values=None, elementwise=None):
    values = values or dtype
    regular, matrices = _params(dtype, values)
    groups = [{"params": regular}, {"params": matrices, "update_proj_gap": 3, **lowrank}]
    optimizer = cls(groups, lr=lr, weight_decay=weight_decay, fused=fused_path, elementwise=elementwise)
    generator = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in regular + matrices]
    # correlated gradients (a fixed part + noise): M / (sqrt(V) + eps), uncorrected, grows over the first
    # steps, so the norm-growth limiter engages (test_limiter_engages_in_these_runs)
    base = [torch.randn(p.shape, generator=generator) for p in regular + matrices]
    for _ in range(steps):
        for p, b in zip(regular + matrices, base):
            p.grad = (b + 0.5 * torch.randn(p.shape, generator=generator)).to(values).to(dtype)
        optimizer.step()
    return [p.detach() for p in regular + matrices], start, optimizer


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_float32_matches_the_plain_path(name):
    cls, lowrank = CONFIGS[name]
    fast, start, fast_opt = _run(cls, lowrank, torch.float32, True)
    plain, _, plain_opt = _run(cls, lowrank, torch.float32, False)
    for a, b, w0 in zip(fast, plain, start):
        update = (b - w0).norm()
        assert update > 0.01
        assert (a - b).norm() <= 4 * torch.finfo(torch.float32).eps * b.norm(), (name, ((a - b).norm() / b.norm()).item())
    if cls is apollo.GaLore:  # the same operations in the same order
        assert all(torch.equal(a, b) for a, b in zip(fast[2:], plain[2:]))
    for p_fast, p_plain in zip(fast_opt.param_groups[1]["params"], plain_opt.param_groups[1]["params"]):
        s_fast, s_plain = fast_opt.state[p_fast], plain_opt.state[p_plain]
        assert s_fast["step"] == s_plain["step"] == 7
        # the gradients here do not depend on the weights, so P and R, hence the moments, are the same bits
        assert torch.equal(s_fast["exp_avg"], s_plain["exp_avg"])
        assert torch.equal(s_fast["exp_avg_sq"], s_plain["exp_avg_sq"])
        if "limiter_norm" in s_plain:
            torch.testing.assert_close(s_fast["limiter_norm"], s_plain["limiter_norm"], rtol=2e-6, atol=0)


@pytest.mark.parametrize("name", ["apollo channel", "apollo tensor, scale_front", "galore"])
def test_fused_bfloat16_is_at_least_as_accurate_as_the_plain_path(name):
    """bfloat16 rounds differently on the two paths (the fused ones round once, from float32), so both
    are measured against the float64 run from the same bfloat16 weights and gradients."""
    cls, lowrank = CONFIGS[name]
    fast, _, _ = _run(cls, lowrank, torch.bfloat16, True, steps=3)
    plain, _, _ = _run(cls, lowrank, torch.bfloat16, False, steps=3)
    exact, start, _ = _run(cls, lowrank, torch.float64, False, steps=3, values=torch.bfloat16)
    for a, b, ref, w0 in zip(fast, plain, exact, start):
        assert a.dtype == torch.bfloat16
        fast_error, plain_error = (a.double() - ref).norm(), (b.double() - ref).norm()
        assert fast_error <= 1.1 * plain_error + 1e-12, (name, fast_error.item(), plain_error.item())
        assert fast_error <= 0.01 * (ref - w0).norm() + torch.finfo(torch.bfloat16).eps * ref.norm()


def test_limiter_engages_in_these_runs():
    """The comparisons above cover both branches of the limiter: engaged (the norm grows by exactly gamma)
    and idle (it grows by less)."""
    history = []
    for steps in range(1, 5):
        _, _, optimizer = _run(apollo.APOLLO, {"rank": 3}, torch.float32, True, steps=steps)
        history.append(torch.stack([optimizer.state[p]["limiter_norm"] for p in optimizer.param_groups[1]["params"]]))
    growth = torch.stack([after / before for before, after in zip(history, history[1:])])
    engaged = (growth - 1.01).abs() < 1e-5
    assert engaged.sum() >= 4 and (growth[~engaged] < 1.01).all() and (~engaged).sum() >= 1, growth


@pytest.mark.parametrize("lr, weight_decay", [(0.02, 0.0), (0.02, 0.1), (1.0, 1.5)])
def test_fused_adamw_equals_the_spec_adamw(lr, weight_decay):
    """torch's fused kernel with eps / sqrt(1 - beta2^t) and the decay reparametrised is the spec's AdamW."""
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(50, generator=generator, dtype=torch.float64)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    ref_w, ref_m, ref_v = w.clone(), m.clone(), v.clone()
    for step in range(1, 5):
        g = torch.randn(50, generator=generator, dtype=torch.float64)
        fused.fused_adamw([w], [g], [m], [v], step=step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-6,
                          weight_decay=weight_decay)
        apollo.functional.adamw_update(ref_w, g, ref_m, ref_v, step=step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-6,
                                       weight_decay=weight_decay)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, ref_v, rtol=1e-13, atol=0)


def test_chunk_bounds():
    assert list(fused.chunk_bounds([3, 3, 3, 10, 1], limit=6)) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert list(fused.chunk_bounds([2, 2], limit=100)) == [(0, 2)]
    assert list(fused.chunk_bounds([], limit=1)) == []
    # a second bound on the gradients' sizes
    assert list(fused.chunk_bounds([1, 1, 1], limit=100, grad_sizes=[5, 5, 5], grad_limit=10)) == [(0, 2), (2, 3)]
    assert list(fused.chunk_bounds([60, 1, 1], limit=60, grad_sizes=[1, 9, 1], grad_limit=10)) == [(0, 1), (1, 3)]


def test_step_chunks_bound_the_gradients_on_the_cpu_only():
    moments, grads = [1, 1, 1], [2**21, 2**21, 2**21]
    assert list(fused.step_chunks(moments, grads, torch.device("cpu"))) == [(0, 2), (2, 3)]
    assert list(fused.step_chunks(moments, grads, torch.device("cuda"))) == [(0, 3)]
    big = [fused.CHUNK_ELEMENTS // 2 + 1] * 3
    assert list(fused.step_chunks(big, [1, 1, 1], torch.device("cuda"))) == [(0, 1), (1, 2), (2, 3)]


def test_chunking_does_not_change_the_update(monkeypatch):
    whole, _, _ = _run(apollo.APOLLO, {"rank": 3}, torch.float32, True, steps=4)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 40)  # one or two matrices per chunk
    chunked, _, _ = _run(apollo.APOLLO, {"rank": 3}, torch.float32, True, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("lowrank", [{"rank": 3}, {"rank": 1, "scale_type": "tensor", "scale": 128.0}])
def test_cpu_gradient_chunks_do_not_change_the_update(monkeypatch, lowrank):
    whole, _, _ = _run(apollo.APOLLO, lowrank, torch.float32, True, steps=4)
    monkeypatch.setattr(fused, "CPU_CHUNK_GRAD_ELEMENTS", 250)  # one matrix per chunk (240 or 256 numbers)
    chunked, _, _ = _run(apollo.APOLLO, lowrank, torch.float32, True, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("fused_path", [True, False])
def test_a_weight_whose_first_gradient_comes_late_is_not_limited(fused_path):
    """In one chunk, weight B takes its first step while A already has a limiter norm: B's first update is
    not limited (l = 1), as on the plain path, whatever A's limiter does."""
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.nn.Parameter(torch.randn(12, 8, generator=generator)) for _ in range(2))
    optimizer = apollo.APOLLO([{"params": [a, b], "rank": 2}], lr=0.01, fused=fused_path)
    a.grad = torch.randn(12, 8, generator=generator)
    optimizer.step()  # B has no gradient yet
    a_norm = optimizer.state[a]["limiter_norm"].clone()
    b_before = b.detach().clone()
    a.grad = 100 * torch.randn(12, 8, generator=generator)  # A's norm jumps: A is limited
    b.grad = torch.randn(12, 8, generator=generator)
    optimizer.step()
    # B alone in a fresh optimizer, same seed position (second parameter of the group), first step
    b_alone = torch.nn.Parameter(b_before.clone())
    alone = apollo.APOLLO([{"params": [torch.nn.Parameter(torch.zeros(12, 8)), b_alone], "rank": 2}], lr=0.01,
                          fused=fused_path)
    b_alone.grad = b.grad.clone()
    alone.step()
    assert torch.equal(b.detach(), b_alone.detach())
    assert torch.equal(optimizer.state[b]["limiter_norm"], alone.state[b_alone]["limiter_norm"])
    # A was limited: its norm grew by gamma = 1.01 exactly, not by ~100
    torch.testing.assert_close(optimizer.state[a]["limiter_norm"], 1.01 * a_norm, rtol=1e-6, atol=0)


def test_fused_flag_reaches_the_optimizer_through_build_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))  # its one layer is named "0"
    assert apollo.build_optimizer("apollo_mini", model, lr=0.01, target_modules=["0"]).fused is True
    assert apollo.build_optimizer("apollo_mini", model, lr=0.01, target_modules=["0"], fused=False).fused is False
    with pytest.raises(ValueError, match=r"^target_modules \('attn', 'mlp'\) selects no trainable 2-D weight"):
        apollo.build_optimizer("apollo_mini", model, lr=0.01)  # the LLaMA default names nothing here: refused


@pytest.mark.slow  # compiles three kernels (about a minute on a loaded 2-core CPU)
def test_compiled_elementwise_step_is_as_close_to_float64_as_foreach(monkeypatch):
    """elementwise="compiled" (the moments and direction in one generated kernel per tensor) rounds
    differently from the plain path, so both fast paths are measured against the float64 plain run."""
    cls, lowrank = CONFIGS["apollo channel"]
    compiled, start, compiled_opt = _run(cls, lowrank, torch.float32, True, elementwise="compiled")
    foreach, _, foreach_opt = _run(cls, lowrank, torch.float32, True, elementwise="foreach")
    exact, _, _ = _run(cls, lowrank, torch.float64, False, values=torch.float32)
    eps = torch.finfo(torch.float32).eps
    for a, b, ref, w0 in zip(compiled, foreach, exact, start):
        assert (ref - w0).norm() > 0.01
        compiled_error, foreach_error = (a.double() - ref).norm(), (b.double() - ref).norm()
        assert compiled_error <= 2 * foreach_error + 4 * eps * ref.norm(), (compiled_error.item(), foreach_error.item())
    moments = [(compiled_opt.state[p]["exp_avg"], foreach_opt.state[q]["exp_avg"])
               for p, q in zip(compiled_opt.param_groups[1]["params"], foreach_opt.param_groups[1]["params"])]
    assert all(torch.allclose(m, n, rtol=1e-5, atol=1e-7) for m, n in moments)


@pytest.mark.parametrize("shape, side", [((512, 256), "right"), ((256, 512), "left")])
def test_a_rank_one_product_split_over_the_threads_is_the_product(monkeypatch, shape, side):
    """fused._project splits a large float32 rank-1 projection into one block of G's rows per thread: the
    result is the float64 product within float32 round-off, and the split path is the one that ran."""
    from apollo.projection import project
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=generator)
    proj = torch.randn((1, shape[1]) if side == "right" else (shape[0], 1), generator=generator)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append(args[0].shape) or bmm(*args))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        split = fused._project(grad, proj, side)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 1 and calls[0][0] == 4  # four blocks
    exact = project(grad.double(), proj.double(), side)
    assert split.shape == exact.shape == ((shape[0], 1) if side == "right" else (1, shape[1]))
    assert ((split.double() - exact).norm() / exact.norm()).item() < 1e-6
    # below the size threshold, at bfloat16, or with rows that do not divide: torch's own product, same bits
    torch.set_num_threads(4)
    try:
        for g, p in [(grad[:3], proj if side == "right" else proj[:3]), (grad.bfloat16(), proj.bfloat16())]:
            assert torch.equal(fused._project(g, p, side), project(g, p, side))
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 1
