"""The contract every registered optimizer keeps, parametrised over `apollo.optimizer_names()`.

A new optimizer gets these tests by being registered; its own test file holds only its math.
"""
import pytest
import torch

import apollo

NAMES = apollo.optimizer_names()


def test_the_registry_is_not_empty():
    assert len(NAMES) >= 11 and "adamw" in NAMES


def _hidden_matrices(model):
    """The attention/MLP weights: what every low-rank and peer optimizer treats as its main case."""
    return [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]


def _distance_after_three_steps(name, tiny_llama, zero_step_first):
    model = tiny_llama(seed=0)
    optimizer = apollo.build_optimizer(name, model, lr=1e-2)
    if zero_step_first:  # torchtitan's state initialisation: every gradient zero, lr 0
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    hidden = _hidden_matrices(model)
    before = [p.detach().clone() for p in hidden]
    batches = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=batches)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return torch.stack([(p.detach() - b).norm() for p, b in zip(hidden, before)]).norm().item()


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_gradient_step_does_not_cripple_later_updates(name, tiny_llama):
    """Three real steps after a zero-gradient lr-0 step move the hidden matrices at least a quarter as far as
    the same three steps without it (issue 25: the limiter froze APOLLO at ~1e-11 of its normal size)."""
    with_zero = _distance_after_three_steps(name, tiny_llama, zero_step_first=True)
    without = _distance_after_three_steps(name, tiny_llama, zero_step_first=False)
    assert without > 0.1, f"{name}: the reference steps barely moved ({without})"
    assert with_zero >= 0.25 * without, f"{name}: {with_zero:.3g} after a zero step vs {without:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_the_specs_default_betas_are_what_the_optimizer_uses(name, tiny_llama):
    spec = apollo.get_spec(name)
    optimizer = apollo.build_optimizer(name, tiny_llama(), lr=1e-2)
    betas = {tuple(group["betas"]) for group in optimizer.param_groups if "betas" in group}
    assert spec.takes_betas and betas, f"{name}: no betas in its groups"
    assert spec.default_betas in betas, f"{name}: spec says {spec.default_betas}, groups use {betas}"


@pytest.mark.parametrize("name", [n for n in NAMES if "weight_quant" in apollo.get_spec(n).refuses])
def test_a_refused_int8_mode_is_refused_by_the_optimizer_too(name, tiny_llama):
    model = apollo.quantize_model(tiny_llama(), group_size=32)
    with pytest.raises((ValueError, RuntimeError)):
        apollo.build_optimizer(name, model, lr=1e-2)


def test_a_registered_spec_reaches_every_derived_table(monkeypatch):
    """The harness's tables are views of the registry: a spec registered later is in all of them."""
    from train import optimizer_flags
    spec = apollo.OptimizerSpec("test_sgd", lambda model, lr, weight_decay=0.0, **o: torch.optim.SGD(model.parameters(), lr=lr),
                                frozenset({"betas", "rank"}), "SGD registered by a test", aliases=("test_sgd_alias",),
                                flags={"rank": "rank"}, default_betas=(0.5, 0.6), states_follow_weights=True,
                                refuses={"fsdp": "a test optimizer"})
    monkeypatch.setattr(apollo.registry, "REGISTRY", {**apollo.REGISTRY, "test_sgd": spec})
    monkeypatch.setattr(apollo.registry, "ALIASES", {**apollo.ALIASES, "test_sgd_alias": "test_sgd"})
    monkeypatch.setattr(apollo, "REGISTRY", apollo.registry.REGISTRY)
    assert apollo.canonical_name("test_sgd_alias") == "test_sgd"
    assert optimizer_flags.FLAG_OPTIONS["rank"]["test_sgd"] == "rank"
    assert optimizer_flags.default_betas("test_sgd") == (0.5, 0.6) and optimizer_flags.DEFAULT_BETAS["test_sgd"] == (0.5, 0.6)
    assert "test_sgd" in optimizer_flags.PARAM_DTYPE_STATES
    assert optimizer_flags.MODES["fsdp"]["test_sgd"] == "a test optimizer"
    with pytest.raises(ValueError, match=r"OptimizerSpec 'bad': unknown mode\(s\) \['fp8'\]"):
        apollo.OptimizerSpec("bad", spec.build, frozenset(), "", refuses={"fp8": "no"})
    with pytest.raises(ValueError, match=r"OptimizerSpec 'bad': flags set option\(s\) \['rank'\] it does not take"):
        apollo.OptimizerSpec("bad", spec.build, frozenset(), "", flags={"rank": "rank"})
