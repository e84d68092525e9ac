"""SCALE (apollo/scale.py) against PEERS.md's equations: float64 re-derivations, closed-form steps, routing,
state bytes, resume, bf16 with float32 states, meta device, per-parameter rebuild, int8 weights, a tiny LLaMA."""
import io
import math

import pytest
import torch

import apollo
from apollo.scale import OPTIONS, SCALE, build
from tests.conftest import make_tiny_llama

HIDDEN_SHAPES = [(12, 5), (5, 12), (7, 7)]  # tall, wide, square Linear weights (out x in)
EMBED_SHAPE, HEAD_SHAPE, NORM_SHAPES = (20, 6), (20, 6), [(6,), (5,)]


# ------------------------------------------------------------------------------ the reference (float64)


def ref_normalise(x: torch.Tensor, norm_dim: int, norm: str) -> torch.Tensor:
    """N(X) written slice by slice from PEERS.md: each row (norm_dim=1) / column (norm_dim=0) divided by
    max(rms or L2 norm of that slice, 1e-8)."""
    out = torch.empty_like(x)
    slices = x.shape[0] if norm_dim == 1 else x.shape[1]
    for i in range(slices):
        values = [float(v) for v in (x[i] if norm_dim == 1 else x[:, i])]
        total = sum(v * v for v in values)
        scale = math.sqrt(total / len(values)) if norm == "rms" else math.sqrt(total)
        scale = max(scale, 1e-8)
        normalised = torch.tensor([v / scale for v in values], dtype=x.dtype)
        if norm_dim == 1:
            out[i] = normalised
        else:
            out[:, i] = normalised
    return out


class Reference:
    """SCALE's rules, float64, from PEERS.md: W <- (1 - lr wd) W - lr u."""

    def __init__(self, weights, rules, *, momentum, betas, eps, norm):
        self.w = [w.clone().double() for w in weights]
        self.rules, self.momentum, self.betas, self.eps, self.norm = rules, momentum, betas, eps, norm
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.t = 0

    def step(self, grads, lr, adam_lr, wd):
        self.t += 1
        b1, b2 = self.betas
        for i, (rule, g) in enumerate(zip(self.rules, grads)):
            g = g.double()
            if rule == "hidden":
                u, rate = ref_normalise(g, 1, self.norm), lr
            elif rule == "embedding":
                u, rate = ref_normalise(g, 0, self.norm), lr
            elif rule == "lm_head":
                self.m[i] = self.momentum * self.m[i] + (1 - self.momentum) * g
                u, rate = ref_normalise(self.m[i], 1, self.norm), lr
            else:  # adamw, eps on the uncorrected sqrt(v)
                self.m[i] = b1 * self.m[i] + (1 - b1) * g
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                k = math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
                u, rate = k * self.m[i] / (self.v[i].sqrt() + self.eps), adam_lr
            self.w[i] = (1 - rate * wd) * self.w[i] - rate * u


def _weights(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = HIDDEN_SHAPES + [EMBED_SHAPE, HEAD_SHAPE] + NORM_SHAPES
    rules = ["hidden"] * len(HIDDEN_SHAPES) + ["embedding", "lm_head"] + ["adamw"] * len(NORM_SHAPES)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes], rules


def _grads(weights, step, dtype=None):
    generator = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in weights]
    embed = len(HIDDEN_SHAPES)
    grads[embed][torch.arange(EMBED_SHAPE[0]) % 3 == 0] = 0.0  # tokens absent from the batch: zero rows that count
    return [g.to(dtype or w.dtype) for g, w in zip(grads, weights)]


def _groups(params, *, lr, adam_lr, momentum=0.9, norm="rms", eps=1e-8):
    h = len(HIDDEN_SHAPES)
    return [
        {"params": params[:h], "name": "hidden", "rule": "column_norm", "norm_dim": 1, "lr": lr},
        {"params": [params[h]], "name": "embedding", "rule": "column_norm", "norm_dim": 0, "lr": lr},
        {"params": [params[h + 1]], "name": "lm_head", "rule": "momentum_column_norm", "norm_dim": 1, "lr": lr,
         "momentum": momentum},
        {"params": params[h + 2:], "name": "adamw", "rule": "adamw", "lr": adam_lr, "eps": eps},
    ]


def _optimizer(params, *, lr=0.05, adam_lr=0.01, weight_decay=0.1, norm="rms", state_dtype=None, momentum=0.9,
               eps=1e-8):
    return SCALE(_groups(params, lr=lr, adam_lr=adam_lr, momentum=momentum, eps=eps), weight_decay=weight_decay,
                 norm=norm, state_dtype=state_dtype)


MULTIPLIERS = [1.0, 0.5, 0.8, 0.3, 0.9]  # a schedule: every group's lr scaled by the same factor per step


@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_updates_match_float64_rederivation(norm):
    weights, rules = _weights()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    lr, adam_lr, wd, momentum = 0.05, 0.01, 0.1, 0.8
    opt = _optimizer(params, lr=lr, adam_lr=adam_lr, weight_decay=wd, norm=norm, momentum=momentum)
    ref = Reference(weights, rules, momentum=momentum, betas=(0.9, 0.999), eps=1e-8, norm=norm)
    for step, multiplier in enumerate(MULTIPLIERS):
        grads = _grads(weights, step)
        for p, g in zip(params, grads):
            p.grad = g
        for group, base in zip(opt.param_groups, [lr, lr, lr, adam_lr]):
            group["lr"] = base * multiplier
        opt.step()
        ref.step(grads, lr * multiplier, adam_lr * multiplier, wd)
        for i, (p, expected) in enumerate(zip(params, ref.w)):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12, msg=f"{rules[i]} {i} step {step}")
    assert opt.state[params[len(HIDDEN_SHAPES) + 1]]["momentum_buffer"].shape == HEAD_SHAPE


def test_closed_form_2x3_steps():
    lr, wd = 0.1, 0.5
    g = torch.tensor([[1.0, 1.0, 1.0], [2.0, -2.0, 2.0]], dtype=torch.float64)
    # row rule: row rms 1 and 2 -> N = [[1, 1, 1], [1, -1, 1]]; W = ones -> (1 - 0.05) - 0.1 N
    row = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    row.grad = g.clone()
    SCALE([row], lr=lr, weight_decay=wd).step()
    assert torch.allclose(row.detach(), torch.tensor([[0.85, 0.85, 0.85], [0.85, 1.05, 0.85]], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    # column rule: column rms 5/sqrt(2), 0 (floored: zero update), 1
    col = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    col.grad = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, -1.0]], dtype=torch.float64)
    SCALE([{"params": [col], "norm_dim": 0}], lr=lr).step()
    r2 = math.sqrt(2.0)
    expected = -lr * torch.tensor([[3 * r2 / 5, 0.0, 1.0], [4 * r2 / 5, 0.0, -1.0]], dtype=torch.float64)
    assert torch.allclose(col.detach(), expected, rtol=0, atol=1e-15)
    # rms vs the paper's L2 on a row [3, 0, 4] (L2 5, rms 5/sqrt(3)); the zero row stays zero
    for norm, expected_row in [("l2", [0.6, 0.0, 0.8]), ("rms", [3 * math.sqrt(3) / 5, 0.0, 4 * math.sqrt(3) / 5])]:
        w = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
        w.grad = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
        SCALE([w], lr=1.0, norm=norm).step()
        assert torch.allclose(w.detach(), -torch.tensor([expected_row, [0.0] * 3], dtype=torch.float64),
                              rtol=0, atol=1e-15), norm
    # lm_head momentum: M1 = 0.1 G1, N(M1) = N(G1); M2 = 0.09 G1 + 0.1 G2 = [[0.09, 0.09, 0.29], [0, 0, 0.5]]
    head = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = SCALE([{"params": [head], "rule": "momentum_column_norm"}], lr=lr)
    head.grad = g.clone()
    opt.step()
    assert torch.allclose(opt.state[head]["momentum_buffer"], 0.1 * g, rtol=0, atol=1e-16)
    assert torch.allclose(head.detach(), -lr * torch.tensor([[1.0, 1, 1], [1, -1, 1]], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    head.grad = torch.tensor([[0.0, 0.0, 2.0], [-1.8, 1.8, 3.2]], dtype=torch.float64)
    before = head.detach().clone()
    opt.step()
    m2 = torch.tensor([[0.09, 0.09, 0.29], [0.0, 0.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(opt.state[head]["momentum_buffer"], m2, rtol=0, atol=1e-15)
    rms = [math.sqrt((0.09**2 * 2 + 0.29**2) / 3), math.sqrt(0.25 / 3)]
    expected_step = -lr * torch.stack([m2[0] / rms[0], m2[1] / rms[1]])
    assert torch.allclose(head.detach() - before, expected_step, rtol=0, atol=1e-14)


def test_adamw_part_closed_form_and_torch_adamw_without_eps():
    # first step, g = 1, eps = 0.01 on the uncorrected sqrt(v): delta = lr sqrt(1e-3) / (sqrt(1e-3) + 0.01)
    # (torch's AdamW, eps after the correction, would give lr / 1.01)
    norm = torch.nn.Parameter(torch.tensor([2.0, 0.0], dtype=torch.float64))
    opt = SCALE([{"params": [norm], "rule": "adamw", "eps": 0.01}], lr=0.1, weight_decay=0.5)
    norm.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    delta = 0.1 * math.sqrt(1e-3) / (math.sqrt(1e-3) + 0.01)
    assert torch.allclose(norm.detach(), torch.tensor([2.0 * 0.95 - delta, delta], dtype=torch.float64), rtol=0,
                          atol=1e-15)
    assert opt.state[norm]["step"] == 1
    # eps = 0: the epsilon placement is the only difference from torch.optim.AdamW (decay first, as torch)
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(9, generator=generator, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = SCALE([{"params": [ours], "rule": "adamw", "eps": 0.0, "betas": (0.8, 0.99)}], lr=0.03, weight_decay=0.2)
    torch_opt = torch.optim.AdamW([theirs], lr=0.03, betas=(0.8, 0.99), eps=0.0, weight_decay=0.2)
    for _ in range(6):
        g = torch.randn(9, generator=generator, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------ routing


def _llama(tie=False, layers=2, device=None, dtype=None):
    return make_tiny_llama(0, dtype, device, num_hidden_layers=layers, tie_word_embeddings=tie)


def _groups_by_name(opt):
    return {group["name"]: group for group in opt.param_groups}


def test_build_routes_by_module_type_and_logs_counts(caplog):
    model = _llama()
    with caplog.at_level("INFO", logger="apollo.scale"):
        opt = build(model, lr=1e-3)
    groups = _groups_by_name(opt)
    assert set(groups) == {"embedding", "lm_head", "hidden", "adamw"}
    assert groups["embedding"]["params"] == [model.model.embed_tokens.weight]
    assert (groups["embedding"]["rule"], groups["embedding"]["norm_dim"]) == ("column_norm", 0)
    assert groups["lm_head"]["params"] == [model.lm_head.weight]
    assert (groups["lm_head"]["rule"], groups["lm_head"]["momentum"]) == ("momentum_column_norm", 0.9)
    hidden = {id(p) for p in groups["hidden"]["params"]}
    linears = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert hidden == {id(w) for w in linears} and len(linears) == 14
    assert (groups["hidden"]["rule"], groups["hidden"]["norm_dim"], groups["hidden"]["lr"]) == ("column_norm", 1, 1e-3)
    assert all(p.dim() == 1 for p in groups["adamw"]["params"]) and len(groups["adamw"]["params"]) == 5
    assert (groups["adamw"]["lr"], groups["adamw"]["betas"], groups["adamw"]["eps"]) == (0.02, (0.9, 0.999), 1e-8)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert "hidden 14 tensors" in caplog.text and "adamw 5 tensors" in caplog.text
    assert OPTIONS == {"adam_lr", "momentum", "norm", "betas", "eps", "state_dtype"}
    opt = build(model, lr=1e-2, adam_lr=0.005, momentum=None, norm="l2", betas=(0.8, 0.9), eps=1e-6,
                state_dtype="float32")  # None means "the default", as apollo.build_optimizer passes
    groups = _groups_by_name(opt)
    assert groups["adamw"]["lr"] == 0.005 and groups["lm_head"]["momentum"] == 0.9
    assert _groups_by_name(build(model, lr=1e-2, momentum=0.5))["lm_head"]["momentum"] == 0.5
    assert {g["norm"] for g in opt.param_groups} == {"l2"} and groups["adamw"]["betas"] == (0.8, 0.9)
    assert {g["state_dtype"] for g in opt.param_groups} == {"float32"}


def test_build_and_constructor_refuse_bad_values():
    model = _llama(layers=1)
    with pytest.raises(ValueError, match="does not take option"):
        build(model, lr=1e-3, rank=4)
    with pytest.raises(ValueError, match="adam_lr must be >= 0"):
        build(model, lr=1e-3, adam_lr=-1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        build(model, lr=1e-3, norm="linf")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        build(model, lr=1e-3, momentum=1.0)
    w, v = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))
    cases = [({"params": [w], "rule": "sgd"}, "rule must be one of"),
             ({"params": [w], "norm_dim": 2}, "norm_dim must be 0"),
             ({"params": [w], "lr": -1.0}, "lr must be >= 0"),
             ({"params": [w], "weight_decay": -0.1}, "weight_decay must be >= 0"),
             ({"params": [v], "rule": "adamw", "betas": (0.9, 1.0)}, "betas must be two numbers"),
             ({"params": [v], "rule": "adamw", "eps": -1.0}, "eps must be >= 0"),
             ({"params": [v], "name": "norms"}, "'norms': rule 'column_norm' takes 2-D weights only"),
             ({"params": [w], "state_dtype": "int8"}, "state_dtype must be None")]
    for group, message in cases:
        with pytest.raises(ValueError, match=message):
            SCALE([group])


def test_tied_embeddings_get_the_column_rule_and_no_momentum():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = build(model, lr=0.01)
    groups = _groups_by_name(opt)
    assert "lm_head" not in groups and groups["embedding"]["params"] == [model.lm_head.weight]
    assert all(g["rule"] != "momentum_column_norm" for g in opt.param_groups)
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=batch, labels=batch).loss.backward()
    shared = model.lm_head.weight
    grad, before = shared.grad.double(), shared.detach().double().clone()
    opt.step()
    assert shared not in opt.state or not opt.state[shared]
    torch.testing.assert_close(shared.detach().double(), before - 0.01 * ref_normalise(grad, 0, "rms"),
                               rtol=1e-6, atol=1e-6)
    expected = sum(2 * p.numel() * 4 + 8 for p in model.parameters() if p.dim() == 1)
    assert apollo.optimizer_state_bytes(opt) == expected
    # a config that says tied over two distinct tensors: the head is a plain row-rule matrix, still no momentum
    untied = _llama(layers=1)
    untied.config.tie_word_embeddings = True
    groups = _groups_by_name(build(untied, lr=0.01))
    assert "lm_head" not in groups and any(p is untied.lm_head.weight for p in groups["hidden"]["params"])


# ---------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("dtype,state_dtype,size", [(torch.float32, None, 4), (torch.bfloat16, None, 2),
                                                    (torch.bfloat16, "float32", 4)])
def test_state_bytes_equal_the_formula(dtype, state_dtype, size):
    """0 per hidden matrix and for the embedding; lm_head m n; AdamW 2 numbers per element + an int step."""
    model = _llama(dtype=dtype)
    opt = build(model, lr=1e-3, state_dtype=state_dtype)
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    vocab, hidden = model.lm_head.weight.shape
    norms = [p for p in model.parameters() if p.dim() == 1]
    expected = size * vocab * hidden + sum(2 * size * p.numel() + 8 for p in norms)
    assert apollo.optimizer_state_bytes(opt) == expected
    assert len(opt.state) == 1 + len(norms)  # nothing is kept for the stateless matrices


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(opt, params, start, stop, grad_dtype=None):
    for step in range(start, stop):
        for p, g in zip(params, _grads(params, step, grad_dtype)):
            p.grad = g
        opt.step()


def test_bfloat16_weights_with_float32_states_follow_the_float64_run():
    """bf16 weights and gradients, float32 momentum and AdamW moments: each step equals the float64
    reference's step from the same bf16 values, up to the bf16 rounding of the result."""
    weights, rules = _weights(torch.bfloat16)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = _optimizer(params, state_dtype="float32")
    ref = Reference([w.double() for w in weights], rules, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, norm="rms")
    for step in range(3):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads, 0.05, 0.01, 0.1)
        for i, (p, expected) in enumerate(zip(params, ref.w)):
            assert p.dtype == torch.bfloat16
            error = (p.double() - expected).abs().max()
            assert error <= 3 * 2**-8 * expected.abs().max(), (rules[i], step, float(error))
            ref.w[i] = p.detach().double().clone()  # continue from the same bf16 weights
    head = params[len(HIDDEN_SHAPES) + 1]
    assert opt.state[head]["momentum_buffer"].dtype == torch.float32
    assert opt.state[params[-1]]["exp_avg_sq"].dtype == torch.float32


def test_float16_weights_with_small_gradients_get_finite_updates():
    """1/rms of a 1e-6 gradient is 1e6, beyond float16's range: the factor stays float32."""
    w = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float16))
    head = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float16))
    opt = SCALE([{"params": [w]}, {"params": [head], "rule": "momentum_column_norm"}], lr=0.1)
    w.grad = torch.tensor([[1e-6, -1e-6, 1e-6], [2e-6, 2e-6, -2e-6]], dtype=torch.float16)
    head.grad = w.grad.clone()
    opt.step()
    signs = torch.tensor([[-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    for p in (w, head):
        torch.testing.assert_close(p.float(), 0.1 * signs, rtol=3e-3, atol=0)
