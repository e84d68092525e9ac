"""param_groups and build_optimizer: which weights are low-rank, names, aliases, presets, option checks."""
import pytest
import torch

import apollo
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_llama()


def test_param_groups_split_llama(tiny_llama):
    regular, low_rank = apollo.param_groups(tiny_llama, rank=4)
    names = {id(p): n for n, p in tiny_llama.named_parameters()}
    low_names = sorted(names[id(p)].split(".")[-2] for p in low_rank["params"])
    # 7 projections per layer x 2 layers
    assert low_names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] * 2)
    regular_names = sorted(names[id(p)] for p in regular["params"])
    assert regular_names == sorted([
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")),
    ])
    assert low_rank["rank"] == 4 and "rank" not in regular


def test_build_optimizer_presets(tiny_llama):
    opt = apollo.build_optimizer("apollo", tiny_llama, lr=0.01)
    low = opt.param_groups[1]
    assert isinstance(opt, apollo.APOLLO)
    assert (low["rank"], low["scale_type"], low["scale"], low["proj"]) == (16, "channel", 1.0, "random")  # hidden 64 / 4
    mini = apollo.build_optimizer("apollo_mini", tiny_llama, lr=0.01).param_groups[1]
    assert (mini["rank"], mini["scale_type"], mini["scale"]) == (1, "tensor", 128.0)
    svd = apollo.build_optimizer("apollo_svd", tiny_llama, lr=0.01, rank=4).param_groups[1]
    assert (svd["rank"], svd["proj"]) == (4, "svd")
    galore = apollo.build_optimizer("galore_adamw", tiny_llama, lr=0.01, scale=0.5)
    assert isinstance(galore, apollo.GaLore) and galore.param_groups[1]["scale"] == 0.5
    adamw = apollo.build_optimizer("adamw", tiny_llama, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["weight_decay"] == 0.1
    alias = apollo.build_optimizer("apollo_adamw", tiny_llama, lr=0.01, rank=2, scale_front=True, betas=(0.8, 0.9))
    assert alias.param_groups[1]["scale_front"] is True and alias.param_groups[1]["betas"] == (0.8, 0.9)


def test_none_options_mean_preset(tiny_llama):
    opt = apollo.build_optimizer("apollo_mini", tiny_llama, lr=0.01, rank=None, scale=None)
    assert opt.param_groups[1]["scale"] == 128.0


def test_build_optimizer_rejects_unknown_names_and_options(tiny_llama):
    names = ", ".join(apollo.optimizer_names() + tuple(apollo.ALIASES))  # the registry's, not a copy of it
    assert names.startswith("adamw, apollo, apollo_mini, apollo_svd, galore, ") and "apollo_adamw" in names
    with pytest.raises(ValueError, match=f"unknown optimizer 'sgd'; choose one of: {names}$"):
        apollo.build_optimizer("sgd", tiny_llama, lr=0.01)
    with pytest.raises(ValueError, match="optimizer 'galore' does not take option\\(s\\) scale_type"):
        apollo.build_optimizer("galore", tiny_llama, lr=0.01, scale_type="tensor")
    with pytest.raises(ValueError, match="optimizer 'adamw' does not take option\\(s\\) rank"):
        apollo.build_optimizer("adamw", tiny_llama, lr=0.01, rank=4)


def test_registry_aliases_and_peer_options(tiny_llama):
    assert apollo.canonical_name("SCALE_SGD") == "scale" and apollo.canonical_name("fira_adamw") == "fira"
    with pytest.raises(ValueError, match="optimizer 'muon' does not take option\\(s\\) rank"):
        apollo.build_optimizer("muon", tiny_llama, lr=0.01, rank=4)
    with pytest.raises(ValueError, match="optimizer 'scale' does not take option\\(s\\) alpha"):
        apollo.build_optimizer("scale", tiny_llama, lr=0.01, alpha=0.5)
    # each entry's builder returns the class its summary names
    kinds = {name: type(apollo.build_optimizer(name, tiny_llama, lr=0.01)).__name__
             for name in ("fira", "scale", "muon", "adam_mini", "soap")}
    assert kinds == {"fira": "Fira", "scale": "SCALE", "muon": "MuonAdamW", "adam_mini": "AdamMini", "soap": "SOAP"}


def test_default_rank_needs_a_hidden_size():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="rank is required"):
        apollo.build_optimizer("apollo", model, lr=0.01, target_modules=("0",))


def test_deprecated_optimizer_names_constant_still_works():
    """apollo.OPTIMIZER_NAMES was removed without an alias when optimizer_names() came (issue 25.7)."""
    with pytest.warns(DeprecationWarning, match=r"use apollo.optimizer_names\(\)"):
        names = apollo.OPTIMIZER_NAMES
    assert names == apollo.optimizer_names() and "apollo_mini" in names
    with pytest.raises(AttributeError, match="has no attribute 'NO_SUCH_NAME'"):
        apollo.NO_SUCH_NAME
