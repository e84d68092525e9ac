"""apollo/base.py: the one hyper-parameter check (its three wordings, line for line), a refused param group is
not kept, and step(closure) returns the closure's loss computed with gradients on, for every class on the base."""
import math

import pytest
import torch
from torch import nn

import apollo
from apollo.fira import Fira
from apollo.adam_mini import AdamMini
from apollo.base import check_hyperparameters
from apollo.muon import MuonAdamW
from apollo.scale import SCALE
from apollo.soap import SOAP

GOOD = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


@pytest.mark.parametrize("bad,wording,line", [
    ({"lr": -1.0}, "group", "G: lr must be >= 0, got -1.0"),
    ({"betas": (0.9, 1.0)}, "group", "G: betas must be two numbers in [0, 1), got (0.9, 1.0)"),
    ({"betas": (0.9,)}, "group", "G: betas must be two numbers in [0, 1), got (0.9,)"),
    ({"eps": -1e-08}, "group", "G: eps must be >= 0, got -1e-08"),
    ({"weight_decay": "0.1"}, "group", "G: weight_decay must be >= 0, got '0.1'"),
    ({"lr": -1.0}, "torch", "G: Invalid learning rate: -1.0 (must be >= 0)"),
    ({"betas": (1.0, 0.9)}, "torch", "G: Invalid beta1: 1.0 (must be in [0, 1))"),
    ({"eps": math.nan}, "torch", "G: Invalid eps: nan (must be >= 0)"),
    ({"lr": -1}, "adam_mini", "G: invalid learning rate -1 (must be >= 0)"),
    ({"betas": (0.9, 0.99, 0.9)}, "adam_mini", "G: betas must be two numbers (beta1, beta2), got (0.9, 0.99, 0.9)"),
    ({"betas": (0.9, -0.5)}, "adam_mini", "G: invalid beta2 -0.5 (must be in [0, 1))"),
    ({"weight_decay": -0.1}, "adam_mini", "G: invalid weight_decay -0.1 (must be >= 0)"),
])
def test_each_wording_is_one_exact_line(bad, wording, line):
    with pytest.raises(ValueError) as error:
        check_hyperparameters({**GOOD, **bad}, "G", wording=wording)
    assert str(error.value) == line


def test_only_the_named_keys_are_checked_and_tensor_values_are_accepted():
    check_hyperparameters({**GOOD, "eps": -1.0}, "G", keys=("lr", "betas"))  # eps not asked for
    check_hyperparameters({**GOOD, "lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), 0.999)}, "G")
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -0.0099999997\d* \(must be >= 0\)$"):
        check_hyperparameters({**GOOD, "lr": torch.tensor(-0.01)}, wording="torch")


def _optimizers(weight: nn.Parameter, norm: nn.Parameter):
    """Every class on BaseOptimizer, over one 8 x 8 weight and one vector."""
    return {
        "APOLLO": apollo.APOLLO([{"params": [weight], "rank": 2}, {"params": [norm]}]),
        "GaLore": apollo.GaLore([{"params": [weight], "rank": 2}, {"params": [norm]}]),
        "Fira": Fira([{"params": [weight], "rank": 2}, {"params": [norm]}]),
        "SCALE": SCALE([{"params": [weight]}, {"params": [norm], "rule": "adamw"}]),
        "AdamMini": AdamMini([{"params": [weight], "block": "row"}, {"params": [norm], "block": "tensor"}]),
        "SOAP": SOAP([weight, norm]),
        "MuonAdamW": MuonAdamW([{"params": [weight], "kind": "muon"}, {"params": [norm], "kind": "adamw"}]),
    }


@pytest.mark.parametrize("name", ["APOLLO", "GaLore", "Fira", "SCALE", "AdamMini", "SOAP", "MuonAdamW"])
def test_a_refused_group_is_not_kept_and_step_returns_the_closures_loss(name):
    torch.manual_seed(0)
    weight, norm = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    optimizer = _optimizers(weight, norm)[name]
    extra = {"params": [nn.Parameter(torch.randn(8, 8))], "lr": -1.0}
    if name == "MuonAdamW":
        extra["kind"] = "adamw"
    if name == "AdamMini":
        extra["block"] = "row"
    groups = list(optimizer.param_groups)
    with pytest.raises(ValueError, match="lr must be >= 0, got -1.0|invalid learning rate -1.0"):
        optimizer.add_param_group(extra)
    assert optimizer.param_groups == groups  # the refused group is gone

    calls = []

    def closure():
        optimizer.zero_grad()
        loss = (weight ** 2).sum() + norm.sum()
        loss.backward()  # fails unless step() turned gradients back on
        calls.append(loss)
        return loss

    for _ in range(2):  # SOAP's first step only initialises
        start = weight.detach().clone()
        loss = optimizer.step(closure)
        assert loss is calls[-1]
    assert len(calls) == 2
    assert torch.equal(weight.grad, 2 * start)  # the closure's gradient, at the weight it saw
    assert not torch.equal(weight, start)  # and the step used it
