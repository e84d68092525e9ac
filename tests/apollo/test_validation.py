"""Bad hyperparameters fail at construction with a ValueError that names the group and the value."""
import pytest
import torch

import apollo


def _weight(shape=(16, 8)):
    return torch.nn.Parameter(torch.randn(shape))


@pytest.mark.parametrize("group,message", [
    ({"rank": 0}, "param group 'low' : rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, "rank must be an integer >= 1, got 2.5"),
    ({"rank": 2, "proj": "gaussian"}, "proj must be one of ('random', 'svd'), got 'gaussian'"),
    ({"rank": 2, "proj_type": "up"}, "proj_type must be one of ('std', 'reverse_std', 'left', 'right'), got 'up'"),
    ({"rank": 2, "scale_type": "row"}, "scale_type must be one of ('channel', 'tensor'), got 'row'"),
    ({"rank": 2, "scale": 0}, "scale must be > 0, got 0"),
    ({"rank": 2, "scale": -1.0}, "scale must be > 0, got -1.0"),
    ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap must be an integer >= 1, got 0"),
    ({"rank": 2, "norm_growth_gamma": 0.9}, "norm_growth_gamma must be >= 1, got 0.9"),
    ({"rank": 8}, "rank 8 must be smaller than both dimensions of parameter 0 (shape (16, 8))"),
    ({"rank": 2, "lr": -0.1}, "lr must be >= 0, got -0.1"),
])
def test_bad_low_rank_group(group, message):
    with pytest.raises(ValueError) as error:
        apollo.APOLLO([{"params": [_weight()], "name": "low", **group}])
    assert message.replace("'low' :", "'low':") in str(error.value)


def test_non_2d_tensor_in_low_rank_group():
    with pytest.raises(ValueError, match=r"param_groups\[0\]: low-rank groups take 2-D weights only; parameter 1 has shape \(8,\)"):
        apollo.APOLLO([{"params": [_weight(), torch.nn.Parameter(torch.randn(8))], "rank": 2}])


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"betas": (1.0, 0.9)}, "Invalid beta1: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta2: -0.1"),
    ({"eps": -1e-8}, "Invalid eps: -1e-08"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"state_dtype": "int8"}, "state_dtype must be None"),
])
def test_bad_optimizer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apollo.APOLLO([_weight()], **kwargs)


def test_galore_refuses_random_projection():
    with pytest.raises(ValueError, match="GaLore projects with the gradient's SVD only, got proj='random'"):
        apollo.GaLore([{"params": [_weight()], "rank": 2, "proj": "random"}])


def test_missing_keys_take_documented_defaults():
    opt = apollo.APOLLO([{"params": [_weight()], "rank": 2}])
    group = opt.param_groups[0]
    for key, value in apollo.APOLLO.lowrank_defaults.items():
        assert group[key] == value
    assert apollo.APOLLO.lowrank_defaults == {
        "proj_type": "std", "update_proj_gap": 200, "proj": "random", "scale_type": "channel", "scale": 1.0,
        "scale_front": False, "norm_growth_limiter": True, "norm_growth_gamma": 1.01,
    }
    assert apollo.GaLore([{"params": [_weight()], "rank": 2}]).param_groups[0]["scale"] == 0.25
