"""Fira (apollo/fira.py): a float64 re-derivation from PEERS.md's six steps, a closed-form 2x3 step, state bytes,
resume, dtypes, int8 weights, the meta device, layer-wise rebuilding, and a tiny LLaMA that learns."""
import io
import math

import pytest
import torch

import apollo
from apollo import fira
from apollo.fira import Fira
from tests.apollo.reference import ReferenceAdamW
from tests.conftest import make_tiny_llama


# ------------------------------------------------------------------ the reference, written from PEERS.md "Fira"
class ReferenceFira:
    """Fira for one matrix in float64, step by step as PEERS.md states it (proj_type "std")."""

    def __init__(self, weight, *, rank, gap, lr, alpha, weight_decay=0.0, limiter=True, gamma=1.01,
                 paper_form=False, betas=(0.9, 0.999), eps=1e-6):
        self.w = weight.double().clone()
        m, n = weight.shape
        self.left = m < n  # m < n: P = U[:, :r]; m >= n: Q = V^T[:r]
        self.rank, self.gap, self.lr, self.alpha, self.wd = rank, gap, lr, alpha, weight_decay
        self.limiter, self.gamma, self.paper_form = limiter, gamma, paper_form
        (self.b1, self.b2), self.eps = betas, eps
        self.t, self.p, self.m, self.v, self.s = 0, None, None, None, None
        self.branches = []  # per step: None (first step), True (limited), False (not limited)
        self.ratios = []  # ||S|| / (s + 1e-8) of the steps after the first

    def step(self, grad):
        g = grad.double()
        if self.t % self.gap == 0:  # 1. SVD of the current gradient in float32, at t = 0, T, 2T, ...
            u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
            self.p = (u[:, :self.rank] if self.left else vh[:self.rank]).double()
        self.t += 1
        p = self.p
        r = p.T @ g if self.left else g @ p.T
        back = (lambda x: p @ x) if self.left else (lambda x: x @ p)
        if self.m is None:
            self.m, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.m = self.b1 * self.m + (1 - self.b1) * r  # 2. Adam on R
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        n = self.m / (torch.sqrt(self.v) + self.eps)
        c = math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        if self.left:  # 3. phi per column (left) or per row (right)
            phi = torch.linalg.norm(n, dim=0, keepdim=True) / (torch.linalg.norm(r, dim=0, keepdim=True) + 1e-8)
        else:
            phi = torch.linalg.norm(n, dim=1, keepdim=True) / (torch.linalg.norm(r, dim=1, keepdim=True) + 1e-8)
        if self.paper_form:  # 4. the residual
            s = phi * (g - back(r))  # (I - P P^T) G
        else:
            s = phi * (g - self.alpha * back(r))
        if self.limiter:  # 5. the limiter on S
            q = torch.linalg.norm(s)
            if self.s is None:
                self.s = q
                self.branches.append(None)
            else:
                self.ratios.append(float(q / (self.s + 1e-8)))
                ell = max(q / (self.s + 1e-8), self.gamma) / self.gamma
                self.branches.append(bool(ell > 1))
                s = s / ell
                self.s = q / ell
        if self.paper_form:  # 6. the update, then decay
            self.w = self.w - self.lr * c * self.alpha * (back(n) + s)
        else:
            self.w = self.w - self.lr * c * (self.alpha * back(n) + s)
        self.w = self.w - self.lr * self.wd * self.w
        return self.w


SHAPES = [(12, 8), (8, 12), (10, 10)]  # tall (right), wide (left), square (right: m >= n)


def _gradients(shape, steps, seed):
    """Correlated gradients of changing size (S itself hardly depends on G's size: phi divides it out)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    sizes = [1.0, 1.0, 3.0, 0.5, 0.5, 6.0, 1.0][:steps]
    return [size * (base + 0.7 * torch.randn(shape, generator=gen, dtype=torch.float64)) for size in sizes]


def _run_both(shape, *, steps=7, seed=0, **settings):
    gen = torch.Generator().manual_seed(seed + 100)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    regular0 = torch.randn(6, generator=gen, dtype=torch.float64)
    low, regular = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(regular0.clone())
    options = {k: settings[k] for k in ("alpha", "paper_form") if k in settings}
    if "limiter" in settings:
        options["norm_growth_limiter"] = settings["limiter"]
    opt = Fira([{"params": [regular]}, {"params": [low], "rank": 3, "update_proj_gap": 2, **options}],
               lr=0.02, weight_decay=0.1, fused=settings.get("fused", True))
    ref = ReferenceFira(w0, rank=3, gap=2, lr=0.02, weight_decay=0.1, alpha=settings.get("alpha", 0.25),
                        paper_form=settings.get("paper_form", False), limiter=settings.get("limiter", True))
    ref_adam = ReferenceAdamW(regular0, lr=0.02, weight_decay=0.1)
    grads = _gradients(shape, steps, seed)
    for g in grads:
        low.grad, regular.grad = g.clone(), g[0, :6].clone()
        opt.step()
        expected, expected_regular = ref.step(g), ref_adam.step(g[0, :6])
        torch.testing.assert_close(low.detach(), expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(regular.detach(), expected_regular, rtol=1e-10, atol=0)
    return opt, ref, low


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("paper_form", [False, True])
def test_update_equals_the_float64_rederivation(shape, paper_form):
    """7 steps, T = 2 (SVD at t = 0, 2, 4, 6: three refreshes after the first), the limiter limiting and not."""
    opt, ref, low = _run_both(shape, paper_form=paper_form, alpha=0.3)
    # which steps the limiter limited (||S|| / (s + 1e-8) > 1.01; the closest ratio is 1.10, the largest 0.86)
    expected = {(12, 8): [None, True, True, True, False, True, True],
                (8, 12): [None, True, True, True, True, True, False],
                (10, 10): [None, True, True, True, True, True, False]}[shape]
    assert ref.branches == expected, (ref.branches, ref.ratios)
    state = opt.state[low]
    torch.testing.assert_close(state["limiter_norm"], ref.s, rtol=1e-10, atol=0)
    assert state["step"] == 7 and state["limiter_norm"].dtype == torch.float64


@pytest.mark.parametrize("shape", SHAPES)
def test_update_without_the_limiter(shape):
    opt, ref, low = _run_both(shape, limiter=False)
    assert ref.branches == [] and "limiter_norm" not in opt.state[low]


def test_limiter_engages_in_the_optimizer_too():
    """The stored norm after a limited step is ||S|| before limiting / l (< ||S||); after an unlimited one, ||S||."""
    opt, ref, low = _run_both((8, 12), steps=3)  # step 3 is limited
    assert ref.branches[-1] is True
    limited = opt.state[low]["limiter_norm"]
    opt2, _, low2 = _run_both((8, 12), steps=2)
    previous = opt2.state[low2]["limiter_norm"]
    # after the limited step, p = gamma * previous exactly in real arithmetic: ||S|| / l = gamma (p + 1e-8)
    torch.testing.assert_close(limited, 1.01 * (previous + 1e-8), rtol=1e-12, atol=0)


def test_limiter_branches_of_one_update():
    """fira_update alone, from the same state: no previous norm (store ||S||), a previous norm of ||S|| / 2
    (limited: S / l with l = 2 / 1.01, stored ||S|| / l), one of 10 ||S|| (not limited: S unchanged, stored ||S||)."""
    gen = torch.Generator().manual_seed(7)
    w0, g = torch.randn(6, 9, generator=gen, dtype=torch.float64), torch.randn(6, 9, generator=gen, dtype=torch.float64)
    proj = torch.linalg.qr(torch.randn(6, 2, generator=gen, dtype=torch.float64))[0]  # left: P (6, 2)
    settings = dict(side="left", step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, alpha=0.25,
                    paper_form=False, limiter_gamma=1.01)

    def run(previous):
        w, m, v = w0.clone(), torch.zeros(2, 9, dtype=torch.float64), torch.zeros(2, 9, dtype=torch.float64)
        stored = fira.fira_update(w, g, proj, m, v, previous, **settings)
        return w, stored

    w_first, q = run(None)
    full_step = w0 - w_first  # lr c_1 (alpha B(N) + S)
    w_big, stored_big = run(10 * q)
    assert torch.equal(w_big, w_first) and torch.equal(stored_big, q)
    w_small, stored_small = run(q / 2)
    ell = (q / (q / 2 + 1e-8)) / 1.01
    torch.testing.assert_close(stored_small, q / ell, rtol=1e-14, atol=0)
    # the limited step differs from the full one by exactly (1 - 1/l) of its S part: lr c_t S (1 - 1/l)
    s_part = (w_small - w_first) / (1 - 1 / ell)  # = lr c_1 S
    b_part = full_step - s_part  # = lr c_1 alpha B(N): lies in span(P)
    torch.testing.assert_close(b_part, proj @ (proj.T @ b_part), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.linalg.norm(s_part) / (0.1 * math.sqrt(0.001) / 0.1), q, rtol=1e-10, atol=0)


def test_fused_and_plain_paths_are_bit_identical():
    shape = (8, 12)
    a, _, low_a = _run_both(shape, fused=True)
    b, _, low_b = _run_both(shape, fused=False)
    assert torch.equal(low_a, low_b)


def test_paper_form_on_a_rank_r_gradient_is_galore_with_scale_alpha():
    """Turn the new part off: a gradient of rank r lies in span(P), so (I - PP^T) G = 0 and the paper form is
    GaLore (update alpha * c_t * B(N)); the code form's residual (1 - alpha) G is not zero."""
    gen = torch.Generator().manual_seed(3)
    left, right = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randn(3, 14, generator=gen,
                                                                                     dtype=torch.float64)
    w0 = torch.randn(10, 14, generator=gen, dtype=torch.float64)
    fira_w, galore_w = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fira_opt = Fira([{"params": [fira_w], "rank": 3, "alpha": 0.25, "paper_form": True}], lr=0.01)
    galore_opt = apollo.GaLore([{"params": [galore_w], "rank": 3, "scale": 0.25}], lr=0.01)
    for t in range(3):
        g = (left + 0.1 * t) @ right
        fira_w.grad, galore_w.grad = g.clone(), g.clone()
        fira_opt.step()
        galore_opt.step()
    # P comes from a float32 SVD, so (I - PP^T) G is ~1e-7 |G| rather than 0
    torch.testing.assert_close(fira_w.detach(), galore_w.detach(), rtol=1e-6, atol=1e-9)
    code_w = torch.nn.Parameter(w0.clone())
    code_opt = Fira([{"params": [code_w], "rank": 3, "alpha": 0.25}], lr=0.01)
    code_w.grad = left @ right
    code_opt.step()
    assert (code_w.detach() - w0).norm() > 2 * (galore_w.detach() - w0).norm() / 3  # the code form is not GaLore


# ---------------------------------------------------------------------------------- closed form, 2 x 3, rank 1
def test_closed_form_single_step_2x3():
    r"""W 2x3 (left: m < n), G = [[2, 1, 0], [0, 1, 2]]: G G^T = [[5, 1], [1, 5]], top singular vector
    u = (1, 1)/sqrt2 = P (either sign), R = P^T G = sqrt2 (1, 1, 1), B(R) = P R = all ones.
    Step 1: M = 0.1 R, V = 0.001 R^2 = 0.002, N_j = 0.1 sqrt2 / (sqrt(0.002) + 1e-6) = 3.162207 (times the sign),
    phi_j = |N_j| / (sqrt2 + 1e-8) = 2.236018, B(N) = P N = N_j / sqrt2 = 2.236018 everywhere, c_1 = sqrt(0.001)/0.1.
    Code:  S = phi (G - 0.25), update = 0.25 B(N) + S = [[4.472036, 2.236018, 0], [0, 2.236018, 4.472036]].
    Paper: S = phi (G - 1),    update = 0.25 (B(N) + S) = a quarter of that.
    (At rank 1 on the first step phi_j R_j = N_j up to epsilon, so alpha B(N) - alpha phi B(R) ~ 0: both forms
    are ~phi G; the multi-step float64 tests above tell the alpha placements apart.)
    W1 = (W0 - 0.1 c_1 update)(1 - 0.1 * 0.1); the limiter only stores ||S|| on the first step."""
    w0 = torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.0, -0.75]], dtype=torch.float64)
    g = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    n = 0.1 * math.sqrt(2) / (math.sqrt(0.002) + 1e-6)
    phi, bn, c1 = n / (math.sqrt(2) + 1e-8), n / math.sqrt(2), math.sqrt(0.001) / 0.1
    expected = {
        False: ([[0.3549959887761758, -1.0600020056737856, 0.24749999987625276],
                 [1.4849999998762529, -0.07000200567378573, -0.8825040112238242]], phi * torch.linalg.norm(g - 0.25)),
        True: ([[0.45999899710123354, -1.0075005015112568, 0.24749999987625276],
                [1.4849999998762529, -0.017500501511256854, -0.7775010028987666]], phi * torch.linalg.norm(g - 1.0)),
    }
    for paper_form, (numbers, s_norm) in expected.items():
        # the numbers above, from the formulas
        update = 0.25 * bn + phi * (g - 0.25) if not paper_form else 0.25 * (bn + phi * (g - 1.0))
        torch.testing.assert_close((w0 - 0.1 * c1 * update) * 0.99, torch.tensor(numbers, dtype=torch.float64),
                                   rtol=1e-14, atol=1e-15)
        w = torch.nn.Parameter(w0.clone())
        opt = Fira([{"params": [w], "rank": 1, "paper_form": paper_form}], lr=0.1, weight_decay=0.1)
        w.grad = g.clone()
        opt.step()
        # P comes from a float32 SVD (1/sqrt2 rounded to float32): 1e-7 relative
        torch.testing.assert_close(w.detach(), torch.tensor(numbers, dtype=torch.float64), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[w]["limiter_norm"], s_norm, rtol=1e-6, atol=0)
        assert opt.state[w]["projection"].shape == (2, 1) and opt.state[w]["exp_avg"].shape == (1, 3)


# ------------------------------------------------------------------------------------------------ state bytes
STATE_SHAPES = [(24, 8), (8, 24), (16, 16)]


def _params(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, dtype=dtype))] + [
        torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in STATE_SHAPES]


def _make(params, rank=3, gap=3, **kwargs):
    lowrank = {k: kwargs.pop(k) for k in ("paper_form", "norm_growth_limiter") if k in kwargs}
    return Fira([{"params": params[:1]}, {"params": params[1:], "rank": rank, "update_proj_gap": gap, **lowrank}],
                lr=0.01, weight_decay=0.01, **kwargs)


def _train(opt, params, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype,state_dtype,p_bytes,moment_bytes,norm_bytes", [
    (torch.float32, None, 4, 4, 4), (torch.bfloat16, "float32", 2, 4, 4), (torch.bfloat16, None, 2, 2, 4),
    (torch.float64, None, 8, 8, 8)])
def test_state_bytes_equal_the_formula(dtype, state_dtype, p_bytes, moment_bytes, norm_bytes):
    """Per m x n low-rank weight: P (min(m,n) r, gradient dtype) + M, V (2 max(m,n) r, state dtype) + the limiter's
    norm (1, at least float32) + step (an int: 8 bytes). For m <= n: m r + 2 n r + 1 numbers and an int.
    Regular: two moments of its size + step."""
    params = _params(dtype)
    opt = _make(params, state_dtype=state_dtype)
    _train(opt, params, 0, 2)
    r = 3
    low_rank = sum(min(s) * r * p_bytes + 2 * max(s) * r * moment_bytes + norm_bytes + 8 for s in STATE_SHAPES)
    regular = 2 * 5 * moment_bytes + 8
    assert apollo.optimizer_state_bytes(opt) == low_rank + regular
    # without the limiter, one number less per weight
    params = _params(dtype)
    opt = _make(params, state_dtype=state_dtype, norm_growth_limiter=False)
    _train(opt, params, 0, 2)
    assert apollo.optimizer_state_bytes(opt) == low_rank + regular - norm_bytes * len(STATE_SHAPES)


def test_meta_device_step_has_the_real_state():
    """train.memory steps the optimizer once on the meta device: same state keys, shapes, dtypes, bytes."""
    real = _params()
    opt_real = _make(real, state_dtype="float32")
    _train(opt_real, real, 0, 1)
    meta = [torch.nn.Parameter(torch.empty(p.shape, device="meta")) for p in real]
    for p in meta:
        p.grad = torch.empty(p.shape, device="meta")
    opt_meta = _make(meta, state_dtype="float32")
    opt_meta.step()
    opt_meta.step()  # the second step has a limiter norm to compare with
    assert apollo.optimizer_state_bytes(opt_meta) == apollo.optimizer_state_bytes(opt_real)
    for p, q in zip(real, meta):
        a, b = opt_real.state[p], opt_meta.state[q]
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert (value.shape, value.dtype) == (b[key].shape, b[key].dtype) and b[key].device.type == "meta"


# ---------------------------------------------------------------------------------------- resume and dtypes
def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_bfloat16_update_follows_the_float32_one():
    """bf16 weights (small, so that rounding W + dW costs little) with float32 states: two steps within bf16
    arithmetic of the float32 run (relative 3% of the total update)."""
    gen = torch.Generator().manual_seed(5)
    weights = [0.01 * torch.randn(s, generator=gen) for s in [(5,)] + STATE_SHAPES]
    grads = [[torch.randn(w.shape, generator=gen) for w in weights] for _ in range(2)]
    p32 = [torch.nn.Parameter(w.clone()) for w in weights]
    p16 = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in weights]
    o32, o16 = _make(p32), _make(p16, state_dtype="float32")
    for step_grads in grads:
        for a, b, g in zip(p32, p16, step_grads):
            a.grad, b.grad = g.clone(), g.to(torch.bfloat16)
        o32.step()
        o16.step()
    for a, b, w in zip(p32, p16, weights):
        assert ((b.detach().float() - a.detach()).norm() / (a.detach() - w).norm()) < 0.03


# ------------------------------------------------------------------------------------- validation and build
@pytest.mark.parametrize("key,value,message", [
    ("alpha", 0.0, "alpha must be a number > 0, got 0.0"),
    ("alpha", True, "alpha must be a number > 0, got True"),
    ("norm_growth_gamma", 0.9, "norm_growth_gamma must be a number >= 1, got 0.9"),
    ("paper_form", "yes", "paper_form must be True or False, got 'yes'"),
    ("norm_growth_limiter", 1, "norm_growth_limiter must be True or False, got 1"),
    ("scale", 0.25, "Fira has no 'scale' key; GaLore's scale is Fira's alpha"),
    ("proj", "random", "Fira projects with the gradient's SVD only, got proj='random'"),
    ("rank", 8, "rank 8 must be smaller than both dimensions of parameter 0"),
    ("update_proj_gap", 0, "update_proj_gap must be an integer >= 1, got 0"),
])
def test_bad_group_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match="param group 'low_rank': " + message.replace("(", r"\(").replace(")", r"\)")):
        Fira([{"params": [torch.nn.Parameter(torch.zeros(8, 12))], "rank": 2, "name": "low_rank", key: value}])


def _tiny_llama(seed=0):
    return make_tiny_llama(seed)


def test_build_routes_attention_and_mlp_weights_and_takes_the_defaults():
    model = _tiny_llama()
    opt = fira.build(model, lr=0.01, weight_decay=0.1)
    regular, low_rank = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".")[-2] for p in low_rank["params"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] * 2)
    assert len(regular["params"]) == len(list(model.parameters())) - 14  # embed, lm_head, norms
    assert low_rank["rank"] == 16 and low_rank["alpha"] == 0.25 and low_rank["update_proj_gap"] == 200
    assert low_rank["norm_growth_gamma"] == 1.01 and low_rank["paper_form"] is False
    assert (regular["eps"], regular["betas"], regular["weight_decay"]) == (1e-6, (0.9, 0.999), 0.1)
    opt = fira.build(model, lr=0.01, rank=4, alpha=0.0625, paper_form=True, proj_type="right", fused=False,
                     state_dtype="float32", update_proj_gap=None)  # None: the default
    low_rank = opt.param_groups[1]
    assert (low_rank["rank"], low_rank["alpha"], low_rank["paper_form"], low_rank["proj_type"]) == (4, 0.0625, True,
                                                                                                  "right")
    assert low_rank["update_proj_gap"] == 200 and opt.fused is False and low_rank["state_dtype"] == "float32"
    with pytest.raises(ValueError, match="optimizer 'fira' does not take option\\(s\\) scale"):
        fira.build(model, lr=0.01, scale=0.25)
    assert fira.OPTIONS == {"rank", "update_proj_gap", "proj_type", "alpha", "norm_growth_limiter",
                            "norm_growth_gamma", "paper_form", "target_modules", "betas", "eps", "state_dtype",
                            "store_projection", "fused"}


def test_int8_weights_step_like_the_float_ones_within_the_quantisation_step():
    """Q-GaLore style: a QuantLinear's float32 copy is updated by Fira and re-quantised. Against a float model
    holding the same (dequantised) weights and the same batch, each int8 weight after the step is within half a
    quantisation step of the float one (groups holding both signs, as quant.py's round-to-nearest promises)."""
    from apollo.quant import QuantLinear, quantize_model

    float_model = _tiny_llama()
    quant_model = quantize_model(_tiny_llama(), group_size=32)
    with torch.no_grad():
        for module, layer in zip(float_model.modules(), quant_model.modules()):
            if isinstance(layer, QuantLinear):
                module.weight.copy_(layer.dequantized_weight())
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizers = [fira.build(m, lr=0.01, rank=4) for m in (float_model, quant_model)]
    before = [m.weight.detach().clone() for m in float_model.modules() if isinstance(m, torch.nn.Linear)][:-1]
    q_before = [layer.weight.clone() for layer in quant_model.modules() if isinstance(layer, QuantLinear)]
    for model, optimizer in zip((float_model, quant_model), optimizers):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    pairs = [(m, q) for m, q in zip(float_model.modules(), quant_model.modules()) if isinstance(q, QuantLinear)]
    assert len(pairs) == len(before) == 14
    checked = 0
    for (module, layer), w_before, q_old in zip(pairs, before, q_before):
        assert layer.weight.dtype == torch.uint8 and optimizers[1].state[layer.weight]["step"] == 1
        groups = module.weight.detach().reshape(-1, 32)
        error = (layer.dequantized_weight().reshape(-1, 32) - groups).abs()
        mixed = (groups.amin(1) < 0) & (groups.amax(1) > 0)
        scales = layer.weight_scales.reshape(-1, 1)
        assert torch.all(error[mixed] <= scales[mixed] / 2 * (1 + 1e-4) + 1e-7)
        checked += int(mixed.sum())
        # the step is larger than the grid: the test would see a missing or wrong update
        assert (module.weight.detach() - w_before).abs().max() > 2 * scales.max()
        assert not torch.equal(layer.weight, q_old)
    assert checked > 0.8 * 640  # of 2 layers x (4 x 32 + 3 x 64) groups of 32
