"""Flora's math only (the generic behaviours are tests/apollo/test_contract.py's): a float64 re-derivation from
PEERS.md's equations, written out here, over several steps across κ re-draws; a closed-form first step; the
state-bytes formula against a real step."""
import math

import pytest
import torch

import apollo
from apollo.flora import Flora, state_bytes

# wide (left projection), tall (right), aspect 20/3 > 4 and min(m, n) = 2 < r (full momenta), a vector
SHAPES = [(6, 10), (10, 6), (3, 20), (2, 8), (7,)]
RANK, KAPPA, STEPS = 3, 2, 5


def _next_seed(seed):
    """PEERS: a CPU generator seeded σ, 15 draws of randint(0, 2^63 - 1), the last one."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2**63 - 1, (15,), generator=generator)[-1])


def _projection(seed, shape, rank):
    """PEERS: (σ_L, σ_R) two randint draws from a CPU generator seeded σ; m < n: L = randn(r, m; σ_L)/√r,
    else R = randn(n, r; σ_R)/√r, in the working dtype (float64 here)."""
    generator = torch.Generator().manual_seed(seed)
    left, right = torch.randint(0, 2**63 - 1, (2,), generator=generator).tolist()
    m, n = shape
    size, draw = ((rank, m), left) if m < n else ((n, rank), right)
    return torch.randn(size, generator=torch.Generator().manual_seed(draw), dtype=torch.float64) / math.sqrt(rank)


def _rms(x):
    return x.norm() / math.sqrt(x.numel())


def _reference(weights, grads, lrs, *, rank, kappa, beta1, c, eps1, eps2, d, wd, factored, scale_parameter, seed):
    """PEERS.md "Flora", one line per equation, float64."""
    weights = [w.clone() for w in weights]
    states = [{"sigma": seed + i} for i in range(1, len(weights) + 1)]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for index, (w, g, s) in enumerate(zip(weights, step_grads, states)):
            decay = 1 - t ** (-c)
            q = g * g + eps1
            is_factored = factored and w.dim() == 2
            if is_factored:
                s["row"] = decay * s.get("row", 0) + (1 - decay) * q.mean(dim=1)
                s["col"] = decay * s.get("col", 0) + (1 - decay) * q.mean(dim=0)
                u = g / torch.sqrt((s["row"] / s["row"].mean())[:, None] * s["col"][None, :])
            else:
                s["v"] = decay * s.get("v", 0) + (1 - decay) * q
                u = g / torch.sqrt(s["v"])
            eligible = (is_factored and beta1 > 0 and min(w.shape) >= rank and max(w.shape) <= 4 * min(w.shape))
            if eligible:
                m, n = w.shape
                D = (lambda x, p: p @ x) if m < n else (lambda x, p: x @ p)
                E = (lambda y, p: p.T @ y) if m < n else (lambda y, p: y @ p.T)
                p = _projection(s["sigma"], w.shape, rank)
                C = s.get("C", torch.zeros_like(D(u, p)))
                history = E(C, p)
                u_tilde = (1 - beta1) * u + beta1 * history
                if t % kappa == 0:
                    s["sigma"] = _next_seed(s["sigma"])
                    p = _projection(s["sigma"], w.shape, rank)
                    C = D(history, p)
                s["C"] = beta1 * C + (1 - beta1) * D(u, p)
            elif beta1 > 0:
                s["M"] = beta1 * s.get("M", 0) + (1 - beta1) * u
                u_tilde = s["M"]
            else:
                u_tilde = u
            u_tilde = u_tilde / max(1.0, (_rms(u_tilde) / d).item())
            rho = lr * max(eps2, _rms(w).item()) if scale_parameter else lr
            weights[index] = w - wd * rho * w - rho * u_tilde
    return weights, states


@pytest.mark.parametrize("factored, beta1, scale_parameter", [
    (True, 0.9, True), (False, 0.9, True), (True, 0.0, True), (True, 0.8, False)])
def test_five_steps_across_redraws_equal_the_float64_rederivation(factored, beta1, scale_parameter):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    lrs = [0.05, 0.1, 0.08, 0.06, 0.04]  # a schedule: group["lr"] set before each step
    settings = dict(rank=RANK, beta1=beta1, c=0.7, eps1=1e-30, eps2=1e-3, d=0.5, wd=0.1, factored=factored,
                    scale_parameter=scale_parameter, seed=5)
    expected, reference_states = _reference(weights, grads, lrs, kappa=KAPPA, **settings)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Flora([{"params": params[:4]}, {"params": params[4:]}], lr=1.0, weight_decay=0.1, rank=RANK,
                      update_proj_gap=KAPPA, betas=(beta1, 0.7), eps=1e-30, eps2=1e-3, clip_threshold=0.5,
                      scale_parameter=scale_parameter, factorize_second_moment=factored, seed=5)
    for step_grads, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    for p, w, e in zip(params, weights, expected):
        assert (p.detach() - e).norm() <= 1e-12 * (e - w).norm(), tuple(p.shape)
    compressed = [i for i, p in enumerate(params) if "seed" in optimizer.state[p]]
    assert compressed == ([0, 1] if factored and beta1 > 0 else [])
    for i in compressed:  # two re-draws (t = 2, 4): the seed advanced twice from 5 + i + 1
        assert optimizer.state[params[i]]["seed"] == _next_seed(_next_seed(5 + i + 1)) == reference_states[i]["sigma"]
        assert torch.allclose(optimizer.state[params[i]]["momentum"], reference_states[i]["C"], rtol=1e-12, atol=0)


def test_the_first_step_in_closed_form():
    """A constant gradient c: Q = c² + ε1, row = col = c² at t = 1 (β̂_1 = 0), U = 1 (all ones); the momentum
    (compressed or not) gives Ũ = (1 - β1) U = 0.1; ρ = η |w0|; so W1 = w0 - η |w0| (λ w0 + 0.1) everywhere.
    With β1 = 0 and d = 0.5: Ũ = 1 / max(1, rms 1 / 0.5) = 0.5."""
    for beta1, clip, term in ((0.9, 1.0, 0.1), (0.0, 0.5, 0.5)):
        params = [torch.nn.Parameter(torch.full(s, -0.3, dtype=torch.float64)) for s in ((8, 12), (12, 8), (5,))]
        optimizer = Flora(params, lr=0.02, weight_decay=0.5, rank=4, betas=(beta1, 0.8), clip_threshold=clip)
        for p in params:
            p.grad = torch.full_like(p, 2.5)
        optimizer.step()
        expected = -0.3 - 0.02 * 0.3 * (0.5 * -0.3 + term)
        for p in params:
            assert torch.allclose(p.detach(), torch.full_like(p, expected), rtol=1e-14, atol=0)
    row = optimizer.state[params[0]]["exp_avg_sq_row"]
    assert torch.allclose(row, torch.full_like(row, 2.5**2 + 1e-30), rtol=1e-15)


def test_state_bytes_formula_equals_a_real_step(tiny_llama):
    """Per m x n (m <= n): compressible r n + m + n floats + seed, step; another matrix m n + m + n + step; a vector
    2 n + step: tiny LLaMA (h 64, I 160, V 256) at r 16: every matrix compressible (256/64 = 4 is allowed)."""
    model = tiny_llama()
    optimizer = apollo.build_optimizer("flora", model, lr=1e-3, rank=16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    expected = 0
    for p in model.parameters():
        if p.dim() == 2:
            m, n = sorted(p.shape)
            expected += 4 * (16 * n + m + n) + 16 if n <= 4 * m else 4 * (m * n + m + n) + 8
        else:
            expected += 4 * 2 * p.numel() + 8
    assert apollo.optimizer_state_bytes(optimizer) == expected == sum(
        state_bytes(tuple(p.shape), 16) for p in model.parameters())
    assert state_bytes((2048, 32000), 512) == 4 * (2048 * 32000 + 2048 + 32000) + 8  # a 1B lm_head: ratio 15.6
    assert state_bytes((2048, 5461), 512, beta1=0.0) == 4 * (2048 + 5461) + 8  # no momentum at all
    assert state_bytes((2048, 5461), 512, factored=False) == 4 * 2 * 2048 * 5461 + 8
