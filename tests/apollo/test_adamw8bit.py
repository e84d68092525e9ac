"""8-bit AdamW (apollo/adamw8bit.py, bitsandbytes on the CPU): the update against a float64 AdamW on the
dequantised states, closed-form steps, state bytes, resume, bf16, meta device, layer-wise rebuild, refusals."""
import io
import math
import sys

import pytest
import torch
from torch import nn

import apollo
from apollo import adamw8bit
from apollo.adamw8bit import OPTIONS, build, optimizer_class, state_bytes
from tests.conftest import make_tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[bnb])")

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1


def _dequantise(codes, absmax, qmap):
    """code book value x block absmax (blocks of 256 consecutive numbers), in float64."""
    flat = qmap.double()[codes.reshape(-1).long()]
    blocks = absmax.double().repeat_interleave(256)[: flat.numel()]
    return (flat * blocks).view(codes.shape)


def _check_quantised(codes, absmax, qmap, exact):
    """absmax = the block maxima of `exact`; each code is the code book entry nearest to x = exact / absmax,
    or one at most 4e-5 farther from x: bitsandbytes' native CPU quantiser misses the nearest code close to
    a midpoint and close to zero (measured on random data: 0.2% of signed codes, 3% of unsigned codes, by at
    most 2.9e-5 of absmax)."""
    flat = exact.reshape(-1)
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 256)]).view(-1, 256)
    block_max = padded.abs().max(dim=1).values
    torch.testing.assert_close(absmax.double(), block_max, rtol=1e-6, atol=0)
    normalised = flat / block_max.repeat_interleave(256)[: flat.numel()]
    nearest = (normalised.unsqueeze(-1) - qmap.double()).abs().argmin(dim=-1)
    got = codes.reshape(-1).long()
    excess = (qmap.double()[got] - normalised).abs() - (qmap.double()[nearest] - normalised).abs()
    assert excess.max() <= 4e-5, excess.max()
    assert (nearest == got).double().mean() >= 0.95


# --------------------------------------------------------------------------------- the update
def test_update_matches_float64_adamw_on_dequantised_states():
    """8-bit (64 x 90: 22.5 blocks) and float32 (32 x 32 and 1-D, under 4096 numbers) states over 5 steps."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 90), (32, 32), (10,)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = optimizer_class()(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    b1, b2 = BETAS
    exact = {i: (torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64)) for i, s in enumerate(shapes)}
    for t in range(1, 6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        before = [p.detach().double().clone() for p in params]
        previous = {}
        for i, p in enumerate(params):
            state = opt.state.get(p, {})
            if i == 0 and state:  # what the 8-bit step starts from: the dequantised codes
                previous[i] = (_dequantise(state["state1"], state["absmax1"], state["qmap1"]),
                               _dequantise(state["state2"], state["absmax2"], state["qmap2"]))
            else:  # float32 states follow a float64 chain
                previous[i] = exact[i]
            p.grad = grads[i].clone()
        opt.step()
        for i, (p, grad) in enumerate(zip(params, grads)):
            m_prev, v_prev = previous[i]
            m = b1 * m_prev + (1 - b1) * grad.double()
            v = b2 * v_prev + (1 - b2) * grad.double() ** 2
            expected = before[i] * (1 - LR * WD) - LR / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
            torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=2e-6)
            state = opt.state[p]
            assert state["step"] == t
            if i == 0:
                assert state["state1"].dtype == state["state2"].dtype == torch.uint8
                assert state["absmax1"].shape == (23,)
                _check_quantised(state["state1"], state["absmax1"], state["qmap1"], m)
                _check_quantised(state["state2"], state["absmax2"], state["qmap2"], v)
            else:
                assert set(state) == {"step", "state1", "state2"} and state["state1"].dtype == torch.float32
                torch.testing.assert_close(state["state1"].double(), m, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(state["state2"].double(), v, rtol=1e-5, atol=1e-9)
                exact[i] = (m, v)


@pytest.mark.parametrize("min_8bit_size", [4096, 0])
def test_closed_form_first_step_2x3(min_8bit_size):
    """First step from zero moments: W <- 0.95 W - 0.1 g / (|g| + eps) = 0.95 W - 0.1 sign(g), in float32 state
    (6 < 4096 numbers) and, with min_8bit_size 0, in 8-bit state (one block of 6: absmax1 = 0.1 max|g| = 0.3,
    absmax2 = 0.001 max g^2 = 0.009, and g = 3 is the code book's 1.0)."""
    w = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    w.grad = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, -0.5]])
    opt = optimizer_class()([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5, min_8bit_size=min_8bit_size)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[0.85, 2.0, 2.75], [3.9, 4.65, 5.8]]), rtol=0, atol=1e-6)
    state = opt.state[w]
    if min_8bit_size:
        assert state["state1"].dtype == torch.float32
        torch.testing.assert_close(state["state1"], 0.1 * w.grad)
        return
    assert state["state1"].dtype == torch.uint8
    torch.testing.assert_close(state["absmax1"], torch.tensor([0.3]))
    torch.testing.assert_close(state["absmax2"], torch.tensor([0.009]))
    assert state["qmap1"][int(state["state1"][0, 2])] == 1.0 and state["qmap2"][int(state["state2"][0, 2])] == 1.0
    m = _dequantise(state["state1"], state["absmax1"], state["qmap1"])
    torch.testing.assert_close(m, 0.1 * w.grad.double(), rtol=0, atol=0.3 * 0.02)  # within a code gap (<2% of absmax)


# -------------------------------------------------------------------------------- state bytes
def _tiny_llama(device=None, seed=0):
    return make_tiny_llama(seed, device=device)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16), ("meta", torch.float32)])
def test_state_bytes_formula(device, dtype):
    """2N + 8 ceil(N/256) + 2048 + 8 per 8-bit tensor (64 x 64 = 4096 numbers is the first 8-bit size),
    8N + 8 below 4096; the meta device steps through bitsandbytes' fake kernels and gets the same state."""
    model = _tiny_llama(device).to(dtype)
    opt = build(model, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if device == "cpu" else torch.empty_like(p)
    opt.step()
    assert apollo.optimizer_state_bytes(opt) == sum(state_bytes(p.numel()) for p in model.parameters())
    q_proj = model.model.layers[0].self_attn.q_proj.weight  # 64 x 64: 8-bit
    norm = model.model.norm.weight                           # 64 numbers: float32 whatever the weight's dtype
    assert set(opt.state[q_proj]) == {"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert opt.state[q_proj]["absmax1"].shape == (16,) and opt.state[q_proj]["state1"].device.type == device
    assert opt.state[norm]["state1"].dtype == torch.float32
    assert state_bytes(4095) == 8 * 4095 + 8 and state_bytes(4097) == 2 * 4097 + 8 * 17 + 2048 + 8


# ------------------------------------------------------------------------------------- resume
def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(64, 90), (32, 32), (10,)]]


def _train(opt, params, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


# --------------------------------------------------------------------------- layer-wise rebuild
def test_layerwise_rebuild_equals_joint_and_keeps_min_8bit_size():
    joint_model, single_model = _tiny_llama(seed=0), _tiny_llama(seed=0)
    joint = build(joint_model, lr=1e-3, weight_decay=0.01, min_8bit_size=8192)
    template = build(single_model, lr=1e-3, weight_decay=0.01, min_8bit_size=8192)
    singles = [type(template)([dict({k: v for k, v in group.items() if k != "params"}, params=[p])])
               for group in template.param_groups for p in group["params"]]
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model in (joint_model, single_model):
            model(input_ids=batch, labels=batch).loss.backward()
        joint.step()
        joint.zero_grad()
        for opt in singles:
            opt.step()
            opt.zero_grad()
    for a, b in zip(joint_model.parameters(), single_model.parameters()):
        assert torch.equal(a, b)
    q_proj = single_model.model.layers[0].self_attn.q_proj.weight  # 4096 < 8192: float32 in the rebuilt one too
    (single,) = [opt for opt in singles if opt.param_groups[0]["params"][0] is q_proj]
    assert single.state[q_proj]["state1"].dtype == torch.float32
    assert joint.state[joint_model.lm_head.weight]["state1"].dtype == torch.uint8  # 8192 numbers


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(betas=(0.9, 1.0)), "betas must be two numbers in"),
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(min_8bit_size=-1), "min_8bit_size must be an integer >= 0"),
    (dict(min_8bit_size=1.5), "min_8bit_size must be an integer >= 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizer_class()([nn.Parameter(torch.zeros(3))], **kwargs)


def test_build_options_and_refusals():
    model = _tiny_llama()
    assert OPTIONS == {"betas", "eps", "min_8bit_size", "state_dtype"}
    assert build(model, lr=1e-3, weight_decay=0.1).param_groups[0]["weight_decay"] == 0.1
    opt = build(model, lr=1e-3, state_dtype="float32")
    (group,) = opt.param_groups
    assert (group["name"], group["betas"], group["eps"], group["weight_decay"], group["min_8bit_size"]) == \
        ("all", (0.9, 0.999), 1e-8, 0.0, 4096)
    assert len(group["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="does not take option"):
        build(model, lr=1e-3, rank=4)
    with pytest.raises(ValueError, match="state_dtype must be None or float32"):
        build(model, lr=1e-3, state_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"adamw8bit cannot update int8 weights \(--weight_quant\)"):
        build(apollo.quantize_model(_tiny_llama(), group_size=32), lr=1e-3)


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    optimizer_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"^adamw8bit needs bitsandbytes: pip install -e \.\[bnb\]$"):
            build(nn.Linear(2, 2), lr=1e-3)
    finally:
        optimizer_class.cache_clear()
    assert adamw8bit.INSTALL_HINT == "adamw8bit needs bitsandbytes: pip install -e .[bnb]"


def test_sharded_parameters_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="--fsdp is not supported for adamw8bit"):
            optimizer_class()([param])
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- tiny LLaMA
