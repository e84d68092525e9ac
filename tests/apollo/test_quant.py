"""int8 weights: the quantisation formula, stochastic rounding, QuantLinear's forward/backward, Q-APOLLO training."""
import copy
import io
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import apollo
from apollo.quant import (QuantLinear, all_reduce_quantized_grads, clip_grad_norm_, dequantize, quantize,
                          quantize_model, quantized_weights)
from tests.conftest import make_tiny_llama


def _tiny_llama(seed=0, dtype=torch.float32):
    return make_tiny_llama(seed, dtype)  # imports transformers when called (the spawned DDP workers import this module)


def test_hand_computed_groups():
    # group 1 straddles zero: s = 3/255, z = -round(-1 / s) = 85, q = round(w / s) + 85
    # group 2 is all >= 0:   s = 0.3/255, z = 0
    # group 3 is all > 0: z clamps to 0 and the top value clips at 255 (the formula's behaviour)
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0], [0.0, 0.1, 0.2, 0.3], [1.0, 2.2, 3.0, 5.0]])
    q, scales, zeros = quantize(w, group_size=4)
    assert q.dtype == torch.uint8 and q.shape == (3, 4)
    assert q.tolist() == [[0, 85, 136, 255], [0, 85, 170, 255], [64, 140, 191, 255]]
    assert zeros.flatten().tolist() == [85, 0, 0]
    torch.testing.assert_close(scales.flatten(), torch.tensor([3 / 255, 0.3 / 255, 4 / 255]))
    expected = torch.tensor([[-1.0, 0.0, 51 * 3 / 255, 2.0], [0.0, 0.1, 0.2, 0.3],
                             [64 * 4 / 255, 140 * 4 / 255, 191 * 4 / 255, 4.0]])  # 5 clips to 255 s = 4
    torch.testing.assert_close(dequantize(q, scales, zeros), expected)


def test_constant_group_gets_the_minimum_range():
    q, scales, zeros = quantize(torch.zeros(2, 8), group_size=8)
    assert torch.all(scales == torch.tensor(1e-5) / 255) and torch.all(q == 0) and torch.all(zeros == 0)


@pytest.mark.parametrize("shape,group_size", [((64, 32), 128), ((48, 40), 8), ((16, 16), 256)])
def test_round_trip_error_is_at_most_half_a_step(shape, group_size):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    q, scales, zeros = quantize(w, group_size)
    assert scales.shape == zeros.shape == (w.numel() // group_size, 1)
    groups = w.reshape(-1, group_size)
    error = (dequantize(q, scales, zeros).reshape(-1, group_size) - groups).abs()
    assert error.max() > 0.3 * scales.max()  # it is a real 8-bit grid, not a float copy
    # every group that holds both signs is within half a step; a one-sign group (only seen with
    # small groups) has z clamped to 0 or 255 and clips at one end, as the formula says
    mixed = (groups.amin(1) < 0) & (groups.amax(1) > 0)
    assert mixed.sum() > 0.8 * len(mixed)
    assert torch.all(error[mixed] <= scales[mixed] / 2 * (1 + 1e-5))


def test_stochastic_rounding_is_unbiased_and_reproducible():
    # 4000 copies of one group share s and z; each element rounds down or up at random
    group = torch.linspace(-1.0, 1.0, 64) + 0.37 / 255  # off-grid values
    copies = group.repeat(4000, 1)
    q, scales, zeros = quantize(copies, 64, generator=torch.Generator().manual_seed(0))
    step = scales[0, 0]
    values = dequantize(q, scales, zeros)
    nearest = dequantize(*quantize(group[None], 64))[0]
    assert torch.all((values - group).abs() < step * (1 + 1e-5))  # only the two neighbours of w
    # mean over draws -> w (std of the mean <= step / (2 sqrt(4000)) = 0.008 step); nearest is biased.
    # The group's two extremes are left out: z is rounded, so one of them lies up to half a step
    # outside the representable range [-z s, (255 - z) s] and is clamped.
    inner = slice(1, -1)
    assert torch.all((values.mean(0) - group)[inner].abs() < 0.05 * step)
    assert (nearest - group)[inner].abs().max() > 0.3 * step
    again, _, _ = quantize(copies, 64, generator=torch.Generator().manual_seed(0))
    other, _, _ = quantize(copies, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q, again) and not torch.equal(q, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_float_linear_with_the_dequantised_weight(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24, bias=True).to(dtype)
    layer = QuantLinear.from_linear(linear, group_size=16)
    reference = torch.nn.Linear(32, 24, bias=True).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight(dtype))
        reference.bias.copy_(linear.bias)
    x = torch.randn(3, 5, 32, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    assert torch.equal(y, reference(x2))
    assert torch.equal(y, F.linear(x, layer.dequantized_weight(dtype), linear.bias))
    grad_out = torch.randn_like(y)
    for _ in range(2):  # two micro-batches: float_grad accumulates like .grad
        layer(x1).backward(grad_out)
        reference(x2).backward(grad_out)
    assert layer.weight.grad is None and layer.weight.float_grad.dtype == dtype
    torch.testing.assert_close(layer.weight.float_grad, reference.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=0, atol=0)


def test_quantize_model_swaps_attention_and_mlp_and_feeds_the_low_rank_group():
    model = quantize_model(_tiny_llama(), group_size=32)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert len(names) == 14 and all(".self_attn." in n or ".mlp." in n for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32
    regular, low_rank = apollo.param_groups(model, rank=2)
    assert {id(p) for p in low_rank["params"]} == {id(w) for w in quantized_weights(model)}
    assert len(regular["params"]) == 2 + 1 + 2 * 2  # embed, lm_head, final norm, two norms per layer
    copied = copy.deepcopy(model).model.layers[0].mlp.up_proj
    assert apollo.quant.quantized_linear(copied.weight) is copied  # the link survives deepcopy


def test_quantize_model_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight \(64, 64\) has 4096 elements, "
                                         r"not divisible by group_size 48"):
        quantize_model(_tiny_llama(), group_size=48)
    with pytest.raises(ValueError, match="only 8-bit weights are supported"):
        quantize_model(_tiny_llama(), bits=4)
    with pytest.raises(ValueError, match="torch.optim.AdamW cannot update int8 weights"):
        apollo.build_optimizer("adamw", quantize_model(_tiny_llama(), group_size=32), lr=0.01)


def _batch():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _train(model, optimizer, steps):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=_batch(), labels=_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,stochastic", [("apollo_mini", True), ("apollo", False), ("galore", False)])
def test_quantised_llama_trains_and_stays_uint8(name, stochastic):
    model = quantize_model(_tiny_llama(), group_size=32, stochastic_round=stochastic)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    optimizer = apollo.build_optimizer(name, model, lr=0.01, rank=None if name == "apollo_mini" else 4,
                                       update_proj_gap=5)
    losses = _train(model, optimizer, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    for weight in quantized_weights(model):
        assert weight.dtype == torch.uint8 and weight.float_grad is None  # zero_grad drops float_grad
        state = optimizer.state[weight]
        assert state["exp_avg"].dtype == torch.float32 and state["step"] == 12
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


def test_bfloat16_model_keeps_float_state_for_int8_weights():
    model = quantize_model(_tiny_llama(dtype=torch.bfloat16), group_size=32)
    for state_dtype, expected in ((None, torch.bfloat16), ("float32", torch.float32)):
        optimizer = apollo.build_optimizer("apollo_mini", model, lr=0.01, state_dtype=state_dtype)
        _train(model, optimizer, 1)
        weight = model.model.layers[1].self_attn.o_proj.weight
        assert weight.dtype == torch.uint8 and optimizer.state[weight]["exp_avg"].dtype == expected


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_with_stochastic_rounding_is_bit_identical():
    def fresh():
        model = quantize_model(_tiny_llama(), group_size=32, stochastic_round=True, seed=7)
        return model, apollo.build_optimizer("apollo_mini", model, lr=0.01, update_proj_gap=3)

    straight, opt = fresh()
    _train(straight, opt, 5)
    first, opt_first = fresh()
    _train(first, opt_first, 3)
    model_state, opt_state = _roundtrip(first.state_dict()), _roundtrip(opt_first.state_dict())
    resumed, opt_resumed = fresh()
    resumed.load_state_dict(model_state)
    opt_resumed.load_state_dict(opt_state)
    _train(resumed, opt_resumed, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.model.layers[0].mlp.up_proj.rounding_state.tolist()[1] == 5


def test_clip_grad_norm_counts_float_grads():
    float_model = _tiny_llama()
    model = quantize_model(copy.deepcopy(float_model), group_size=32)
    with torch.no_grad():  # give the float model the dequantised weights, so both see the same network
        for module, layer in zip(float_model.modules(), model.modules()):
            if isinstance(layer, QuantLinear):
                module.weight.copy_(layer.dequantized_weight())
    for m in (float_model, model):
        m(input_ids=_batch(), labels=_batch()).loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(float_model.parameters(), 0.5)
    total = clip_grad_norm_(model, 0.5)
    torch.testing.assert_close(total, expected)
    clipped = model.model.layers[0].mlp.down_proj.weight.float_grad
    torch.testing.assert_close(clipped, float_model.model.layers[0].mlp.down_proj.weight.grad)


def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = quantize_model(torch.nn.ModuleDict({"mlp": torch.nn.Linear(8, 4)}), group_size=8)
    weight = model["mlp"].weight
    weight.float_grad = torch.full((4, 8), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
    all_reduce_quantized_grads(model)
    results[rank] = weight.float_grad.clone()
    dist.destroy_process_group()


def test_all_reduce_averages_float_grads_across_ranks():
    context = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder, context.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(folder, "init")
        torch.multiprocessing.start_processes(_ddp_worker, args=(2, init_file, results), nprocs=2, start_method="spawn")
        assert torch.equal(results[0], torch.full((4, 8), 1.5)) and torch.equal(results[1], results[0])
