"""State dicts: weights_only round trip, bit-exact resume, state dtype, and state bytes against the formula."""
import io

import pytest
import torch

import apollo

SHAPES = [(24, 8), (8, 24), (16, 16)]


def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, dtype=dtype))] + [
        torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES
    ]


def _make(kind, params, **kwargs):
    regular, low_rank = params[:1], params[1:]
    if kind == "galore":
        return apollo.GaLore([{"params": regular}, {"params": low_rank, "rank": 3, "update_proj_gap": 3}], lr=0.01, **kwargs)
    options = {
        "apollo": dict(rank=3),
        "apollo_mini": dict(rank=1, scale_type="tensor", scale=128.0),
        "apollo_svd": dict(rank=3, proj="svd"),
    }[kind]
    return apollo.APOLLO(
        [{"params": regular}, {"params": low_rank, "update_proj_gap": 3, **options}], lr=0.01, weight_decay=0.01, **kwargs
    )


def _grads(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _train(opt, params, start, stop):
    for step in range(start, stop):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind,store", [("apollo", False), ("apollo", True), ("apollo_mini", False),
                                        ("apollo_svd", False), ("galore", False)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, "float32")])
def test_resume_is_bit_identical(kind, store, dtype, state_dtype):
    # uninterrupted: 8 steps (refreshes at steps 1, 4, 7)
    straight = _params(dtype)
    opt = _make(kind, straight, store_projection=store, state_dtype=state_dtype)
    _train(opt, straight, 0, 8)

    # interrupted at step 5, saved, loaded into fresh objects, continued
    first = _params(dtype)
    opt_first = _make(kind, first, store_projection=store, state_dtype=state_dtype)
    _train(opt_first, first, 0, 5)
    saved_weights = [p.detach().clone() for p in first]
    saved_state = _roundtrip(opt_first.state_dict())

    resumed = _params(dtype)
    with torch.no_grad():
        for p, w in zip(resumed, saved_weights):
            p.copy_(w)
    opt_resumed = _make(kind, resumed, store_projection=store, state_dtype=state_dtype)
    opt_resumed.load_state_dict(saved_state)
    _train(opt_resumed, resumed, 5, 8)

    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    expected_moment_dtype = torch.float32 if state_dtype else dtype
    assert opt_resumed.state[resumed[1]]["exp_avg"].dtype == expected_moment_dtype


def test_state_dict_holds_only_tensors_and_plain_values():
    params = _params()
    opt = _make("apollo", params)
    _train(opt, params, 0, 2)
    allowed = (torch.Tensor, int, float, bool, str, type(None))
    for state in opt.state_dict()["state"].values():
        assert all(isinstance(v, allowed) for v in state.values())


def test_state_bytes_equal_the_formula_when_projection_is_not_stored():
    """Per low-rank m x n weight: M and V of r x L float32 (L the kept dimension) + step + seed (ints) + limiter norm.

    Regular parameters: two moments of their size + step.
    """
    for kind, rank in (("apollo", 3), ("apollo_mini", 1)):
        params = _params()
        opt = _make(kind, params)
        _train(opt, params, 0, 2)
        low_rank = sum(2 * rank * max(s) * 4 + 8 + 8 + 4 for s in SHAPES)  # 'std' keeps max(m, n)
        regular = 2 * 5 * 4 + 8
        assert apollo.optimizer_state_bytes(opt) == low_rank + regular


def test_stored_projection_adds_exactly_p():
    params = _params()
    opt = _make("apollo", params, store_projection=True)
    _train(opt, params, 0, 1)
    expected_p = sum(3 * min(s) * 4 for s in SHAPES)
    without = _make("apollo", _params())
    _train(without, without.param_groups[0]["params"] + without.param_groups[1]["params"], 0, 1)
    assert apollo.optimizer_state_bytes(opt) - apollo.optimizer_state_bytes(without) == expected_p


def test_bfloat16_state_follows_parameter_by_default():
    params = _params(torch.bfloat16)
    opt = _make("apollo", params)
    _train(opt, params, 0, 1)
    assert opt.state[params[1]]["exp_avg_sq"].dtype == torch.bfloat16
