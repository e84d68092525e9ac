"""apollo.muon: torch.optim.Muon for the decoder matrices + torch.optim.AdamW for the rest, as one optimizer."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import apollo
from apollo import muon as M
from tests.conftest import make_tiny_llama

A, B, C = 3.4445, -4.775, 2.0315  # torch's Newton-Schulz coefficients (PEERS.md)
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(tie=False, seed=0, dtype=torch.float32):
    # grouped-query attention: the k/v projections are Muon matrices of another shape than q/o
    return make_tiny_llama(seed, dtype, num_key_value_heads=2, tie_word_embeddings=tie)


def random_grads(model, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    return [[torch.randn(p.shape, generator=generator).to(p.dtype) for p in params] for _ in range(steps)]


def run(model, optimizer, grads):
    params = [p for p in model.parameters() if p.requires_grad]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def hidden_split(model):
    """The test's own routing: every nn.Linear weight inside model.model.layers -> Muon."""
    muon = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in muon}
    return muon, [p for p in model.parameters() if id(p) not in ids]


def p5(x):
    """Five Newton-Schulz iterations on one singular value: x -> a x + b x^3 + c x^5."""
    for _ in range(5):
        x = A * x + B * x ** 3 + C * x ** 5
    return x


# ------------------------------------------------------------------ equal to torch's two optimizers
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_composite_equals_torch_muon_plus_adamw(nesterov, adjust_lr_fn):
    model, reference = tiny_llama(), tiny_llama()
    options = dict(momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn, adam_lr=3e-3, betas=(0.8, 0.95))
    optimizer = M.build(model, lr=0.02, weight_decay=0.1, **options)
    muon, adamw = hidden_split(reference)
    torch_muon = torch.optim.Muon(muon, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                  adjust_lr_fn=adjust_lr_fn)
    torch_adamw = torch.optim.AdamW(adamw, lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))
    grads = random_grads(model, 3)
    run(model, optimizer, grads)

    class Both:
        def step(self):
            torch_muon.step()
            torch_adamw.step()

        def zero_grad(self, set_to_none=True):
            torch_muon.zero_grad(set_to_none)
            torch_adamw.zero_grad(set_to_none)

    run(reference, Both(), grads)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_llama().model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("tie", [False, True])
def test_routing_sends_only_decoder_matrices_to_muon(tie):
    model = tiny_llama(tie=tie)
    optimizer = M.build(model, lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group, adamw_group = optimizer.param_groups
    assert (muon_group["kind"], muon_group["name"], adamw_group["kind"], adamw_group["name"]) == \
        ("muon", "muon", "adamw", "adamw")
    muon_names = [names[id(p)] for p in muon_group["params"]]
    expected = [f"model.layers.{i}.{part}.{proj}.weight" for i in range(2)
                for part, projs in (("self_attn", HIDDEN[:4]), ("mlp", HIDDEN[4:])) for proj in projs]
    assert muon_names == expected
    adamw_ids = {id(p) for p in adamw_group["params"]}
    assert id(model.model.embed_tokens.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert len(adamw_group["params"]) == 2 * 2 + 1 + (1 if tie else 2)  # 2 norms per layer, final norm, embeddings
    # the inner torch optimizers hold the same dicts and state
    assert optimizer._inner["muon"].param_groups == [muon_group] and optimizer._inner["muon"].param_groups[0] is muon_group
    assert optimizer._inner["adamw"].param_groups[0] is adamw_group
    assert optimizer._inner["muon"].state is optimizer.state is optimizer._inner["adamw"].state


def test_routing_logs_counts_and_leaves_frozen_parameters_out(caplog):
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    with caplog.at_level("INFO", logger="apollo.muon"):
        muon, adamw = M.param_groups(model)
    assert len(muon) == 13 and len(adamw) == 6
    assert "13 Muon matrices" in caplog.text and "6 AdamW tensors" in caplog.text


def test_routing_needs_a_transformers_decoder():
    with pytest.raises(ValueError, match="muon routes the decoder layers of a transformers model"):
        M.build(nn.Sequential(nn.Linear(4, 4)), lr=0.01)


# ----------------------------------------------------------------- float64 re-derivation, closed form
def _torch_ns(u):
    from torch.optim._muon import _zeropower_via_newtonschulz
    return _zeropower_via_newtonschulz(u, (A, B, C), 5, 1e-7)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_update_equals_a_float64_rederivation(nesterov, adjust_lr_fn):
    """Momentum, Nesterov, decay, lr adjustment and AdamW from PEERS.md's equations in float64.

    torch runs Newton-Schulz in bfloat16, so O comes from torch's function applied to the test's own U
    (its bfloat16 copy is the optimizer's to the bit); the spectral check of O is the next test."""
    torch.manual_seed(0)
    muon_shapes, adamw_shapes = [(12, 5), (5, 12), (6, 6)], [(7,), (4, 3)]
    weights = [torch.randn(s, dtype=torch.float64) for s in muon_shapes + adamw_shapes]
    params = [nn.Parameter(w.clone()) for w in weights]
    lr, wd, mu, adam_lr, adam_wd, (b1, b2), eps = 0.05, 0.1, 0.9, 0.01, 0.2, (0.8, 0.95), 1e-8
    optimizer = M.MuonAdamW([{"params": params[:3], "kind": "muon"}, {"params": params[3:], "kind": "adamw"}],
                            lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
                            adam_lr=adam_lr, adam_weight_decay=adam_wd, betas=(b1, b2), eps=eps)
    expected = [w.clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights[:3]]
    m = [torch.zeros_like(w) for w in weights[3:]]
    v = [torch.zeros_like(w) for w in weights[3:]]
    for t in range(1, 6):
        grads = [torch.randn(w.shape, dtype=torch.float64) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (rows, cols) in enumerate(muon_shapes):
            g = grads[i]
            buffers[i] = mu * buffers[i] + (1 - mu) * g
            u = (1 - mu) * g + mu * buffers[i] if nesterov else buffers[i]
            scale = 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
            expected[i] = (1 - lr * wd) * expected[i] - lr * scale * _torch_ns(u).double()
        for j in range(len(adamw_shapes)):
            g = grads[3 + j]
            m[j] = b1 * m[j] + (1 - b1) * g
            v[j] = b2 * v[j] + (1 - b2) * g * g
            denom = (v[j] / (1 - b2 ** t)).sqrt() + eps
            expected[3 + j] = (1 - adam_lr * adam_wd) * expected[3 + j] - adam_lr * (m[j] / (1 - b1 ** t)) / denom
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 6), (64, 32)])
def test_newton_schulz_maps_singular_values_through_the_quintic(shape):
    """O = U_svd p^5(sigma / ||U||_F) V^T in float64; torch's bfloat16 iteration matches it to ~2%."""
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    left, sigma, right = torch.linalg.svd(u, full_matrices=False)
    exact = left @ torch.diag(p5(sigma / u.norm())) @ right
    got = _torch_ns(u).double()
    assert ((got - exact).norm() / exact.norm()).item() < 0.04
    singular = torch.linalg.svdvals(got)
    assert singular.min() > 0.6 and singular.max() < 1.2  # about orthogonal: spread around 1


@pytest.mark.parametrize("adjust_lr_fn,scale", [("original", 1.0), ("match_rms_adamw", 0.2 * math.sqrt(3))])
def test_closed_form_first_step_2x3(adjust_lr_fn, scale):
    """G = [[3,0,0],[0,4,0]]: the first U is a multiple of G, U/||U||_F has singular values 0.6 and 0.8,
    five quintic steps map them to 0.72288 and 1.11920 (float64); torch's bfloat16 iteration gives
    0.6953125 and 1.09375 (exact bfloat16 numbers). W1 = (1 - lr wd) W0 - lr s O with s = 1 for a wide
    2x3 ("original") or 0.2 sqrt(3). AdamW's first step on a norm weight: lr sign(g) (+ decay)."""
    assert p5(0.6) == pytest.approx(0.722876168617117, abs=1e-12) and p5(0.8) == pytest.approx(1.11920392994, abs=1e-10)
    w = nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    norm = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    optimizer = M.MuonAdamW([{"params": [w], "kind": "muon"}, {"params": [norm], "kind": "adamw"}], lr=0.1,
                            weight_decay=0.5, adjust_lr_fn=adjust_lr_fn, adam_lr=0.01)
    w.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    norm.grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    optimizer.step()
    o_bf16 = torch.tensor([[0.6953125, 0, 0], [0, 1.09375, 0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), 0.95 - 0.1 * scale * o_bf16, rtol=1e-14, atol=0)
    o_exact = torch.tensor([[0.722876168617117, 0, 0], [0, 1.1192039299160428, 0]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), 0.95 - 0.1 * scale * o_exact, rtol=0, atol=0.1 * scale * 0.03)
    torch.testing.assert_close(norm.detach(), torch.tensor([0.985, 2.0, 2.975], dtype=torch.float64),
                               rtol=1e-9, atol=0)  # (1 - 0.01 * 0.5) w - 0.01 sign(g); eps shifts it by 1e-10


# -------------------------------------------------------------------------------- state bytes, meta
def expected_state_bytes(model):
    muon, adamw = hidden_split(model)
    return (sum(p.numel() * p.element_size() for p in muon)  # momentum buffer
            + sum(2 * p.numel() * p.element_size() + 4 for p in adamw))  # exp_avg, exp_avg_sq, step (0-d float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_equal_the_formula_and_the_meta_step(dtype):
    model = tiny_llama(dtype=dtype)
    optimizer = M.build(model, lr=0.02)
    run(model, optimizer, random_grads(model, 1))
    assert apollo.optimizer_state_bytes(optimizer) == expected_state_bytes(model)
    step = optimizer.state[model.model.norm.weight]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0
    assert set(optimizer.state[model.model.layers[0].self_attn.q_proj.weight]) == {"momentum_buffer"}
    assert all(s["momentum_buffer"].dtype == dtype for p, s in optimizer.state.items() if "momentum_buffer" in s)

    with torch.device("meta"):  # as train.memory counts: build on meta, one step with empty gradients
        meta_model = tiny_llama(dtype=dtype)
    meta_optimizer = M.build(meta_model, lr=0.02)
    for p in meta_model.parameters():
        p.grad = torch.empty_like(p)
    meta_optimizer.step()
    assert apollo.optimizer_state_bytes(meta_optimizer) == apollo.optimizer_state_bytes(optimizer)


# ---------------------------------------------------------------------------------------- resume
def test_resume_through_torch_distributed_checkpoint_state_dict():
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    grads = random_grads(tiny_llama(), 4)
    model = tiny_llama()
    optimizer = M.build(model, lr=0.02, weight_decay=0.1)
    run(model, optimizer, grads[:2])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert "model.layers.0.mlp.up_proj.weight" in optimizer_state["state"]  # keyed by parameter names
    buffer = io.BytesIO()
    torch.save({"model": model_state, "optimizer": optimizer_state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_llama(seed=7)
    resumed_optimizer = M.build(resumed, lr=0.02, weight_decay=0.1)
    set_state_dict(resumed, resumed_optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    run(model, optimizer, grads[2:])
    run(resumed, resumed_optimizer, grads[2:])
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------- lr schedule, layer-wise
def test_the_loops_lr_schedule_reaches_both_parts():
    """train/loop.py sets group["lr"] = base_lr * multiplier on optimizer.param_groups; after a
    load_state_dict (new group dicts) the inner torch optimizers must still see it."""
    grads = random_grads(tiny_llama(), 3)
    model, reference = tiny_llama(), tiny_llama()
    optimizer = M.build(model, lr=0.02, weight_decay=0.1, adam_lr=4e-3)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    muon, adamw = hidden_split(reference)
    torch_muon = torch.optim.Muon(muon, lr=0.02, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(adamw, lr=4e-3, weight_decay=0.1)
    params = list(reference.parameters())
    for step, multiplier in enumerate([1.0, 0.25, 0.0]):
        if step == 1:
            optimizer.load_state_dict(optimizer.state_dict())
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * multiplier
        torch_muon.param_groups[0]["lr"], torch_adamw.param_groups[0]["lr"] = 0.02 * multiplier, 4e-3 * multiplier
        before = [p.detach().clone() for p in model.parameters()]
        run(model, optimizer, grads[step:step + 1])
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        torch_muon.step()
        torch_adamw.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), (step, name)
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert all(moved) if multiplier else not any(moved)  # lr 0: no update and no decay anywhere


def test_lr_schedule_step_sizes():
    """Halving every group["lr"] halves the first Muon move (wd 0: W moves by lr s O) and the first AdamW
    move (lr |g| / (|g| + eps))."""
    moves = {}
    for multiplier in (1.0, 0.5):
        model = tiny_llama(dtype=torch.float64)
        optimizer = M.build(model, lr=0.02, adam_lr=4e-3)
        for group in optimizer.param_groups:
            group["lr"] *= multiplier
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = random_grads(model, 1)
        run(model, optimizer, grads)
        moves[multiplier] = {n: (p.detach() - before[n]) for n, p in model.named_parameters()}
    up = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(moves[0.5][up], 0.5 * moves[1.0][up], rtol=1e-9, atol=1e-15)
    norm = [n for n, _ in model.named_parameters()].index("model.norm.weight")
    g = grads[0][norm].abs()
    for multiplier in (1.0, 0.5):
        torch.testing.assert_close(moves[multiplier]["model.norm.weight"].abs(), 4e-3 * multiplier * g / (g + 1e-8),
                                   rtol=1e-9, atol=0)


def test_a_deep_copy_steps_like_the_original():
    grads = random_grads(tiny_llama(), 2)
    model = tiny_llama()
    optimizer = M.build(model, lr=0.02, weight_decay=0.1)
    run(model, optimizer, grads[:1])
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    assert optimizer_copy._inner["muon"].state is optimizer_copy.state
    assert optimizer_copy._inner["adamw"].param_groups[0] is optimizer_copy.param_groups[1]
    assert optimizer_copy.param_groups[0]["params"][0] is model_copy.model.layers[0].self_attn.q_proj.weight
    run(model, optimizer, grads[1:])
    run(model_copy, optimizer_copy, grads[1:])
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(p, q)


def test_sharded_update_function_equals_torchs_step_on_whole_tensors():
    """sharded_muon_update (the FSDP path) on a plain tensor is torch.optim.Muon's step to the bit."""
    generator = torch.Generator().manual_seed(0)
    for nesterov, fn in [(True, None), (False, "match_rms_adamw")]:
        for shape in [(12, 5), (5, 12)]:
            w = torch.randn(shape, generator=generator)
            ours, theirs = w.clone(), nn.Parameter(w.clone())
            buffer = torch.zeros_like(w)
            optimizer = torch.optim.Muon([theirs], lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                         adjust_lr_fn=fn)
            for _ in range(3):
                g = torch.randn(shape, generator=generator)
                theirs.grad = g.clone()
                optimizer.step()
                M.sharded_muon_update(ours, g, buffer, lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                      ns_coefficients=(A, B, C), ns_steps=5, eps=1e-7, adjust_lr_fn=fn)
            assert torch.equal(ours, theirs.detach())
            assert torch.equal(buffer, optimizer.state[theirs]["momentum_buffer"])


# ------------------------------------------------------------------------------------------- training
# ------------------------------------------------------------------------------------------ refusals
def test_float32_state_for_bfloat16_weights_is_refused():
    model = tiny_llama(dtype=torch.bfloat16)
    for state_dtype in ("float32", torch.float32):
        with pytest.raises(ValueError, match="keep their state in the weights' dtype .bfloat16., so "
                                             "state_dtype=float32 is impossible"):
            M.build(model, lr=0.02, state_dtype=state_dtype)
    with pytest.raises(ValueError, match="state_dtype must be None, a torch.dtype or one of"):
        M.build(model, lr=0.02, state_dtype="fp8")


def test_torch_bug_behind_the_bfloat16_nesterov_false_refusal():
    """torch.optim.Muon (2.13) with nesterov=False hands the bfloat16 buffer itself to Newton-Schulz, which
    divides it by its norm in place: the buffer should be 0.05 g after one step and has norm 1 instead.
    If this test fails, torch fixed it: lift the refusal in MuonAdamW.add_param_group."""
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = nn.Parameter(torch.zeros(6, 4, dtype=torch.bfloat16))
    optimizer = torch.optim.Muon([p], lr=0.0, nesterov=False)
    p.grad = g.clone()
    optimizer.step()
    assert optimizer.state[p]["momentum_buffer"].float().norm().item() == pytest.approx(1.0, abs=0.01)
    assert (0.05 * g.float()).norm().item() < 0.5
    with pytest.raises(ValueError, match="nesterov=False divides the momentum buffer of a bfloat16 weight"):
        M.build(tiny_llama(dtype=torch.bfloat16), lr=0.02, nesterov=False)


@pytest.mark.parametrize("options,message", [
    ({"momentum": 1.0}, "momentum must be in \\[0, 1\\), got 1.0"),
    ({"momentum": -0.1}, "momentum must be in \\[0, 1\\)"),
    ({"ns_steps": 0}, "ns_steps must be an integer in \\[1, 100\\), got 0"),
    ({"ns_steps": 100}, "ns_steps must be an integer"),
    ({"adjust_lr_fn": "sqrt"}, "adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got 'sqrt'"),
    ({"nesterov": 1}, "nesterov must be True or False"),
    ({"adam_lr": -1.0}, "adamw defaults: lr must be >= 0, got -1.0"),
    ({"adam_weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"betas": (0.9, 1.0)}, "betas must be two numbers in \\[0, 1\\)"),
    ({"eps": -1.0}, "eps must be >= 0, got -1.0"),
    ({"foo": 1}, "optimizer 'muon' does not take option\\(s\\) foo"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        M.build(tiny_llama(), lr=0.02, **options)


def test_bad_groups_are_refused():
    w, v = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="param group 'x' needs kind='muon' or kind='adamw', got None"):
        M.MuonAdamW([{"params": [w], "name": "x"}])
    with pytest.raises(ValueError, match=r"\(Muon\) takes 2-D weights only, got shape \(3,\)"):
        M.MuonAdamW([{"params": [v], "kind": "muon"}])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        M.MuonAdamW([{"params": [w], "kind": "muon", "lr": -1.0}])
    optimizer = M.MuonAdamW([{"params": [w], "kind": "muon"}])
    state = optimizer.state_dict()
    other = M.MuonAdamW([{"params": [nn.Parameter(torch.zeros(3, 3))], "kind": "adamw"}])
    with pytest.raises(ValueError, match="group kinds \\['muon'\\] do not match this optimizer's \\['adamw'\\]"):
        other.load_state_dict(state)


def test_options_are_documented():
    assert M.OPTIONS == {"momentum", "nesterov", "adjust_lr_fn", "ns_steps", "adam_lr", "adam_weight_decay",
                         "betas", "eps", "state_dtype"}
    defaults = M.build(tiny_llama(), lr=0.02).param_groups
    assert {k: defaults[0][k] for k in ("momentum", "nesterov", "ns_steps", "adjust_lr_fn", "eps", "weight_decay")} == \
        {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": None, "eps": 1e-7, "weight_decay": 0.0}
    assert {k: defaults[1][k] for k in ("lr", "betas", "eps", "weight_decay")} == \
        {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
