"""8-bit GaLore's math (apollo/galore8bit.py): the low-rank step equals GaLore with the same SVD projection and
bitsandbytes' own Adam8bit on the projected gradient (to the bit, across refreshes) and a float64 Adam on the
dequantised states; a closed-form first step; the regular path equals bitsandbytes' AdamW8bit; the state bytes per
m x n (PEERS.md); the scratch model against a measured step. The generic behaviour (resume, layer-wise, meta,
refusals of the spec's modes) is tests/apollo/test_contract.py's and tests/train/test_peers.py's."""
import math
import sys

import pytest
import torch
from torch import nn

import apollo
from apollo import galore8bit
from apollo.galore8bit import GaLoreAdamW8bit, state_bytes

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[bnb])")

LR, BETAS, EPS, WD, SCALE = 0.01, (0.9, 0.99), 1e-8, 0.1, 0.25


def _dequantise(codes, absmax, qmap):
    """code book value x block absmax (blocks of 256 consecutive numbers), in float64."""
    flat = qmap.double()[codes.reshape(-1).long()]
    return (flat * absmax.double().repeat_interleave(256)[: flat.numel()]).view(codes.shape)


def _svd_projection(grad, rank):
    """GaLore's P from an fp32 SVD, re-derived: m >= n -> top-r rows of V^T (r x n), else top-r columns of U."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (vh[:rank] if grad.shape[0] >= grad.shape[1] else u[:, :rank]).contiguous()


# ------------------------------------------------------------------------------------------ low-rank
# (shape, rank): a wide matrix (left projection, R 16 x 300 = 4800 numbers: 8-bit states) and a tall one
# (right projection, R 300 x 8 = 2400 < 4096: bitsandbytes' float32 states)
LOW_RANK = [((64, 300), 16), ((300, 40), 8)]


def test_low_rank_step_is_galore_with_bitsandbytes_adam8bit_on_the_projection():
    """5 steps, P refreshed at steps 1, 3, 5 (T = 2): every weight equals, to the bit, W + alpha back(N) - lr wd W
    with N = bitsandbytes' Adam8bit step of a zero placeholder from R = project(G) (same P, same op); the 8-bit
    codes equal Adam8bit's; and W is within 2e-6 of a float64 Adam on the dequantised previous states."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for shape, _ in LOW_RANK]
    opt = GaLoreAdamW8bit([{"params": [p], "rank": r, "update_proj_gap": 2, "scale": SCALE} for p, (_, r) in
                           zip(params, LOW_RANK)], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    # the oracle: bitsandbytes' own Adam8bit on a placeholder of R's shape, decay 0
    placeholders = [nn.Parameter(torch.zeros(s[0], r) if s[0] >= s[1] else torch.zeros(r, s[1])) for s, r in LOW_RANK]
    oracle = bnb.optim.Adam8bit(placeholders, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    reference = [p.detach().clone() for p in params]
    exact = [(torch.zeros(z.shape, dtype=torch.float64), torch.zeros(z.shape, dtype=torch.float64)) for z in placeholders]
    projections, b1, b2 = [None, None], *BETAS
    for t in range(1, 6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for i, (p, z, grad, (_, rank)) in enumerate(zip(params, placeholders, grads, LOW_RANK)):
            p.grad = grad.clone()
            if (t - 1) % 2 == 0:
                new = _svd_projection(grad, rank)
                assert projections[i] is None or not torch.allclose(new, projections[i])  # a real refresh
                projections[i] = new
            left = p.shape[0] < p.shape[1]
            z.grad = projections[i].T @ grad if left else grad @ projections[i].T
            z.data.zero_()
            state = oracle.state.get(z, {})
            if "absmax1" in state:  # what the 8-bit step starts from: the dequantised codes
                exact[i] = (_dequantise(state["state1"], state["absmax1"], state["qmap1"]),
                            _dequantise(state["state2"], state["absmax2"], state["qmap2"]))
        opt.step()
        oracle.step()
        for i, (p, z, (_, rank)) in enumerate(zip(params, placeholders, LOW_RANK)):
            proj, left = projections[i], p.shape[0] < p.shape[1]
            back = (proj @ z.detach() if left else z.detach() @ proj).mul_(SCALE)
            reference[i].add_(back)
            reference[i].add_(reference[i], alpha=-LR * WD)
            assert torch.equal(p.detach(), reference[i]), (t, i)
            ours, theirs = opt.state[p], oracle.state[z]
            assert torch.equal(ours["projection"], proj) and ours["step"] == theirs["step"] == t
            for key in ("state1", "state2", "absmax1", "absmax2"):
                assert (key in ours) == (key in theirs) and (key not in ours or torch.equal(ours[key], theirs[key]))
            # float64 Adam from the (dequantised) previous moments, epsilon on the bias-corrected sqrt(v)
            r64 = z.grad.double()
            m = b1 * exact[i][0] + (1 - b1) * r64
            v = b2 * exact[i][1] + (1 - b2) * r64**2
            n64 = -LR / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
            exact[i] = (m, v)
            torch.testing.assert_close(z.detach().double(), n64, rtol=1e-5, atol=1e-9)
    assert opt.state[params[0]]["state1"].dtype == torch.uint8 and opt.state[params[1]]["state1"].dtype == torch.float32


def test_closed_form_first_step():
    """G = diag(3, 2, 1) padded to 3 x 5, rank 2: P = the first two columns of U (+-e1, +-e2), R = P^T G, and
    the first Adam step from zero moments is N = -lr R / (|R| + eps), so whatever the SVD's signs
    W1 = W0 - lr alpha [e1 e1^T + e2 e2^T] sign(G) = W0 - lr alpha (E11 + E22), then W1 <- (1 - lr wd) W1."""
    w0 = torch.arange(15.0).view(3, 5) / 10
    weight = nn.Parameter(w0.clone())
    weight.grad = torch.zeros(3, 5)
    weight.grad[0, 0], weight.grad[1, 1], weight.grad[2, 2] = 3.0, 2.0, 1.0
    opt = GaLoreAdamW8bit([{"params": [weight], "rank": 2, "scale": 0.5}], lr=0.1, weight_decay=0.2)
    opt.step()
    step = torch.zeros(3, 5)
    step[0, 0] = step[1, 1] = 1.0
    expected = w0 - 0.1 * 0.5 * step
    expected = expected - 0.1 * 0.2 * expected
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-7)
    assert opt.state[weight]["projection"].shape == (3, 2) and opt.state[weight]["state1"].shape == (2, 5)


# ------------------------------------------------------------------------------------------- regular
def test_regular_tensors_get_bitsandbytes_adamw8bit():
    """Groups without rank: the same 3 steps as bitsandbytes' AdamW8bit (apollo.adamw8bit), to the bit, with decay
    (W (1 - lr wd) before the step): an 8-bit 64 x 90 matrix and a float32-state vector."""
    g = torch.Generator().manual_seed(1)
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in [(64, 90), (10,)]]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = GaLoreAdamW8bit(ours, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    oracle = apollo.adamw8bit.optimizer_class()(theirs, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        oracle.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q)
            for key, value in opt.state[p].items():
                assert value == oracle.state[q][key] if key == "step" else torch.equal(value, oracle.state[q][key])
    assert opt.state[ours[0]]["state1"].dtype == torch.uint8 and opt.state[ours[1]]["state1"].dtype == torch.float32


# ----------------------------------------------------------------------------------------- state bytes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_per_matrix(tiny_llama, dtype):
    """PEERS.md's state per m x n (m <= n): P m r (in the weights' dtype) + 2 r n + 2 4 ceil(rn / 256) bytes + the step
    (8), 8-bit from 4096 numbers of R on; hidden 128, rank 32: R of q_proj 128 x 32 = 4096 is the first 8-bit size."""
    model = tiny_llama(hidden_size=128, intermediate_size=320, dtype=dtype)
    opt = galore8bit.build(model, lr=1e-3, rank=32)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    p_bytes = torch.tensor([], dtype=dtype).element_size()
    for name, p in model.named_parameters():
        got = sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v)) + 8
        if "proj" in name:  # q/k/v/o 128 x 128, up/gate 320 x 128, down 128 x 320: min side 128, kept side n
            m, n = min(p.shape), max(p.shape)
            assert got == p_bytes * m * 32 + 2 * 32 * n + 2 * 4 * math.ceil(32 * n / 256) + 8, name
        elif p.numel() >= 4096:  # embeddings, lm_head: bitsandbytes' 8-bit AdamW, no code books in the state
            assert got == 2 * p.numel() + 8 * math.ceil(p.numel() / 256) + 8, name
        else:  # norms: float32 m, v
            assert got == 8 * p.numel() + 8, name
        rank = 32 if "proj" in name else None
        assert got == state_bytes(tuple(p.shape), rank, weight_bytes=p_bytes), name
    assert apollo.optimizer_state_bytes(opt) == sum(
        state_bytes(tuple(p.shape), 32 if "proj" in n else None, weight_bytes=p_bytes) for n, p in model.named_parameters())
    assert state_bytes((4096, 11008), 1024, weight_bytes=2) == 2 * 4096 * 1024 + 2 * 1024 * 11008 + 8 * 44032 + 8


# ------------------------------------------------------------------------------------------- scratch
@pytest.mark.parametrize("rank", [16, 100, 4])
def test_scratch_model_matches_measured_low_rank_steps(rank):
    """The low-rank update's temporaries (the spec's scratch model) against the allocator's peak in CPU steps of a
    500 x 128 weight, T = 2: step 3 refreshes P (its SVD, the model's worst step), step 2 does not (the model's other
    phases). Rank 16: the SVD and the back-projection dominate; rank 100 (R 500 x 100): bitsandbytes' 8-bit kernel;
    rank 4 (R 2000 numbers < 4096): its float32-state kernel."""
    from torch.profiler import ProfilerActivity, profile
    from train.memory.measurement import _allocation_peak

    weight = nn.Parameter(torch.randn(500, 128))
    opt = GaLoreAdamW8bit([{"params": [weight], "rank": rank, "update_proj_gap": 2, "name": "low_rank"}], lr=1e-3)
    peaks = []
    for _ in range(3):  # the first step also creates the state
        weight.grad = torch.randn_like(weight)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        peaks.append(_allocation_peak(prof))
    group = opt.param_groups[0]
    phases = galore8bit.low_rank_scratch(weight, group, p=4, device="cpu")
    worst = apollo.get_spec("galore8bit").scratch_bytes(weight, group, name="galore_adamw8bit", p=4, device="cpu")
    assert worst == max(phases.values())
    for measured, estimated in [(peaks[2], worst), (peaks[1], max(v for k, v in phases.items() if k != "svd"))]:
        assert abs(measured - estimated) <= 0.05 * estimated + 16384, (rank, measured, estimated)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kwargs,message", [
    (dict(state_dtype="bfloat16"), "state_dtype must be None or float32"),
    (dict(min_8bit_size=-1), "min_8bit_size must be an integer >= 0"),
    (dict(rank=64), "rank 64 must be smaller than both dimensions"),
    (dict(foo=1), "does not take option"),
])
def test_bad_settings_are_one_line(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        galore8bit.build(tiny_llama(), lr=1e-3, **{"rank": 4, **kwargs})
    assert "\n" not in str(error.value)


def test_missing_bitsandbytes_is_one_line(monkeypatch, tiny_llama):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    galore8bit._functional.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"^galore_adamw8bit needs bitsandbytes: pip install -e \.\[bnb\]$"):
            galore8bit.build(tiny_llama(), lr=1e-3, rank=4)
    finally:
        galore8bit._functional.cache_clear()
