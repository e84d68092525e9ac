"""Layer-wise updates: the same weights as the joint optimizer, gradients freed in backward, exact resume."""
import io

import pytest
import torch

import apollo
from apollo.layerwise import LayerwiseOptimizer, check_layerwise
from apollo.quant import quantize_model, quantized_weights
from tests.conftest import make_tiny_llama

STEPS = 3


def _model(quantized=False, seed=0):
    model = make_tiny_llama(seed)
    return quantize_model(model, group_size=32, stochastic_round=True) if quantized else model


def _batch(step):
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(10 + step))


def _schedule(step):  # warmup then decay, so every update has its own lr
    return [0.5, 1.0, 0.7, 0.4, 0.2, 0.1][step]


def _options(name):
    return {"adamw": {}, "apollo": {"rank": 4, "update_proj_gap": 2}, "apollo_mini": {"update_proj_gap": 2},
            "galore": {"rank": 4, "update_proj_gap": 2}}[name]


def _joint(model, name, start=0, stop=STEPS, optimizer=None):
    optimizer = optimizer or apollo.build_optimizer(name, model, lr=0.01, weight_decay=0.1, **_options(name))
    base = [group["lr"] for group in optimizer.param_groups]
    for step in range(start, stop):
        for group, lr in zip(optimizer.param_groups, base):  # what train/loop.py does
            group["lr"] = lr * _schedule(step)
        model(input_ids=_batch(step), labels=_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _layerwise(model, name, start=0, stop=STEPS, optimizer=None):
    optimizer = optimizer or LayerwiseOptimizer(model, name, lr=0.01, weight_decay=0.1, lr_lambda=_schedule,
                                                **_options(name))
    for step in range(start, stop):
        model(input_ids=_batch(step), labels=_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_int8_layerwise_equals_joint_with_stochastic_rounding():
    joint_model, layer_model = _model(quantized=True), _model(quantized=True)
    _joint(joint_model, "apollo_mini")
    layerwise = _layerwise(layer_model, "apollo_mini")
    _assert_same_weights(joint_model, layer_model)  # uint8 weights, scales, zeros and rounding counters
    weight = quantized_weights(layer_model)[0]
    assert weight.dtype == torch.uint8 and weight.float_grad is None
    assert layerwise.state[weight]["step"] == STEPS


def test_gradients_are_freed_during_backward():
    model = _model(quantized=True)
    params = list(model.parameters())
    alive = []
    optimizer = LayerwiseOptimizer(model, "apollo_mini", lr=0.01)
    # a second hook on every parameter, registered after the optimizer's, counts the gradients still held
    for param in params:
        apollo.quant.register_post_accumulate_grad_hook(
            param, lambda p: alive.append(sum(apollo.quant.gradient(q) is not None for q in params)))
    model(input_ids=_batch(0), labels=_batch(0)).loss.backward()
    assert len(alive) == len(params) and max(alive) == 0
    joint_model = _model(quantized=True)
    joint_model(input_ids=_batch(0), labels=_batch(0)).loss.backward()
    expected = torch.nn.utils.get_total_norm(apollo.quant.gradients(joint_model))
    optimizer.step()
    torch.testing.assert_close(optimizer.last_grad_norm, expected)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name,quantized", [("apollo_mini", True), ("adamw", False)])
def test_state_dict_round_trip_resumes_exactly(name, quantized):
    straight = _model(quantized)
    _layerwise(straight, name, 0, 5)

    first = _model(quantized)
    optimizer = _layerwise(first, name, 0, 3)
    saved_model, saved_optimizer = _roundtrip(first.state_dict()), _roundtrip(optimizer.state_dict())
    assert saved_optimizer["names"][0] == "model.embed_tokens.weight"

    resumed = _model(quantized, seed=1)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    fresh = LayerwiseOptimizer(resumed, name, lr=0.01, weight_decay=0.1, lr_lambda=_schedule, **_options(name))
    fresh.load_state_dict(saved_optimizer)
    assert fresh.get_last_lr()[0] == pytest.approx(0.01 * _schedule(3))
    _layerwise(resumed, name, 3, 5, optimizer=fresh)
    _assert_same_weights(straight, resumed)


def test_load_state_dict_refuses_another_model():
    optimizer = LayerwiseOptimizer(_model(), "apollo_mini", lr=0.01)
    state = optimizer.state_dict()
    state["names"] = state["names"][1:] + ["extra.weight"]
    with pytest.raises(ValueError, match="missing \\['model.embed_tokens.weight'\\], unexpected \\['extra.weight'\\]"):
        optimizer.load_state_dict(state)


def test_check_layerwise_names_the_flag():
    check_layerwise(gradient_accumulation=1, grad_clipping=0.0, world_size=1)
    with pytest.raises(ValueError, match="set --gradient_accumulation 1 \\(got 4"):
        check_layerwise(gradient_accumulation=4)
    with pytest.raises(ValueError, match="set --grad_clipping 0 \\(got 1.0\\)"):
        check_layerwise(grad_clipping=1.0)
    with pytest.raises(ValueError, match="use --single_gpu and one process \\(got 2\\)"):
        check_layerwise(world_size=2)
    with pytest.raises(ValueError, match="use --nan_policy stop"):
        check_layerwise(nan_policy="skip")


@pytest.mark.parametrize("quantized", [False, True])
def test_layerwise_with_activation_checkpointing_equals_joint(quantized):
    # the recomputed forward of a layer runs before that layer's weights are updated
    joint_model, layer_model = _model(quantized), _model(quantized)
    for model in (joint_model, layer_model):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    _joint(joint_model, "apollo_mini")
    _layerwise(layer_model, "apollo_mini")
    _assert_same_weights(joint_model, layer_model)


@pytest.mark.parametrize("options", [{"fused": False}, {"elementwise": "compiled"}, {}])
def test_the_joint_optimizers_step_options_carry_to_every_layer(options):
    """fused and elementwise are not group keys: each per-parameter optimizer gets them from the joint one
    (they were dropped, so --layerwise ran the fused foreach step whatever was asked)."""
    model = _model()
    layerwise = LayerwiseOptimizer(model, "apollo", lr=0.01, rank=4, **options)
    expected = {"fused": True, "elementwise": None, **options}
    assert len(layerwise.optimizers) == len(list(model.parameters()))
    assert all(optimizer.step_options() == expected for optimizer in layerwise.optimizers)

