"""torchtitan's FQN-pattern routing of apollo's optimizers, checked without torchtitan.

`titan_groups.route` applies torchtitan 0.3's first-match rule; the optimizer built from its groups must
have `apollo.build_optimizer`'s param groups (same tensors, same order, same settings) and take the
same steps to the bit. The torchtitan side (the real container, DCP) is tests/apollo/test_torchtitan.py (slow).
"""
import copy
import sys
import re

import pytest
import torch

import apollo
from apollo.integrations import titan_groups
from tests.conftest import make_tiny_llama

# torchtitan 0.3's Llama-3 debug model, layer 0 and the rest (printed from model_registry("debugmodel")).
LLAMA3_NAMES = ["tok_embeddings.weight", "layers.0.attention.qkv_linear.wqkv.weight", "layers.0.attention.wo.weight",
                "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight",
                "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_llama()  # untied head: SCALE's lm_head group


def planned_names():
    """The registered names `group_plan` routes; the rest must say they need hand-written groups."""
    names = []
    for name in apollo.optimizer_names():
        try:
            titan_groups.group_plan(name, 1e-3, hidden_size=32)
            names.append(name)
        except ValueError as error:
            assert "no FQN-pattern routing" in str(error) and "by hand" in str(error), (name, error)
    return names


def test_constructors_cover_the_registry():
    assert set(titan_groups.CONSTRUCTORS) == set(apollo.optimizer_names())
    assert set(planned_names()) == set(apollo.optimizer_names()) - {"adam_mini"}  # adam_mini: by hand


def test_llama3_pattern_picks_attention_and_feed_forward_weights():
    low = re.compile(titan_groups.LLAMA3.matrices)
    picked = [n for n in LLAMA3_NAMES if low.search(n)]
    assert picked == LLAMA3_NAMES[1:6]
    # activation checkpointing wraps each block: the wrapper's segment must not change the split
    wrapped = [n.replace("layers.0.", "layers.0._checkpoint_wrapped_module.") for n in LLAMA3_NAMES]
    assert [n for n in wrapped if low.search(n)] == wrapped[1:6]
    regular = re.compile(titan_groups._not(titan_groups.LLAMA3.matrices))
    assert [n for n in LLAMA3_NAMES if regular.search(n)] == [LLAMA3_NAMES[0]] + LLAMA3_NAMES[6:]
    kinds = {kind: [n for n in LLAMA3_NAMES if re.search(getattr(titan_groups.LLAMA3, kind), n)]
             for kind in ("vectors", "embedding", "head")}
    assert kinds == {"vectors": LLAMA3_NAMES[6:9], "embedding": ["tok_embeddings.weight"], "head": ["lm_head.weight"]}
    rest = re.compile(titan_groups._not(titan_groups.LLAMA3.embedding, titan_groups.LLAMA3.head, titan_groups.LLAMA3.matrices))
    assert [n for n in LLAMA3_NAMES if rest.search(n)] == LLAMA3_NAMES[6:9]


@pytest.mark.parametrize("name", planned_names())
def test_pattern_routing_equals_build_optimizer(tiny_llama, name):
    options = {k: v for k, v in {"rank": 4, "update_proj_gap": 2}.items() if k in apollo.REGISTRY[name].options}
    reference_model, titan_model = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    reference = apollo.build_optimizer(name, reference_model, lr=1e-2, weight_decay=0.1, **options)
    configs, constructor = titan_groups.group_plan(name, 1e-2, 0.1, fqns=titan_groups.HF_LLAMA,
                                                   **options)
    groups = titan_groups.route(titan_model.named_parameters(), configs)
    assert list(groups) == [apollo.canonical_name(name)]
    # torchtitan adds its implementation flags to every group: they must be ignored
    titan = titan_groups.build_from_groups(name, [{**g, "fused": True, "foreach": False} for g in groups[name]],
                                           **constructor)
    assert type(titan) is type(reference)
    position = {id(p): i for i, p in enumerate(titan_model.parameters())}
    ref_position = {id(p): i for i, p in enumerate(reference_model.parameters())}
    assert len(titan.param_groups) == len(reference.param_groups)
    for ours, theirs in zip(titan.param_groups, reference.param_groups):
        assert [position[id(p)] for p in ours["params"]] == [ref_position[id(p)] for p in theirs["params"]]
        assert ours["param_names"] == [n for n, p in titan_model.named_parameters() if id(p) in map(id, ours["params"])]
        assert {k: v for k, v in ours.items() if k not in ("params", "param_names")} == \
            {k: v for k, v in theirs.items() if k != "params"}
    assert getattr(titan, "fused", None) == getattr(reference, "fused", None)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # crosses a projection refresh (update_proj_gap 2)
        for p, q in zip(reference_model.parameters(), titan_model.parameters()):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        reference.step()
        titan.step()
    for p, q in zip(reference_model.parameters(), titan_model.parameters()):
        assert torch.equal(p, q)


def test_preset_settings_fill_a_rank_group(tiny_llama):
    weight = tiny_llama.model.layers[0].mlp.up_proj.weight
    mini = titan_groups.build_from_groups("apollo_mini", [{"params": [weight], "param_names": ["w"], "rank": 1,
                                                           "lr": 0.1}])
    group = mini.param_groups[0]
    assert (group["scale"], group["scale_type"], group["proj"]) == (128.0, "tensor", "random")
    assert "fused" not in group and group["param_names"] == ["w"]


def test_refusals():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        titan_groups.build_from_groups("lion", [])
    with pytest.raises(ValueError, match="give rank, or hidden_size"):
        titan_groups.group_plan("apollo", 1e-2)
    with pytest.raises(ValueError, match="give fqns"):
        titan_groups.group_plan("apollo", 1e-2, rank=4, target_modules=("attn",))
    with pytest.raises(ValueError, match="does not take option"):
        titan_groups.group_plan("apollo", 1e-2, rank=4, momentum=0.9)
    with pytest.raises(ValueError, match="matched no parameters"):
        titan_groups.route([("a.weight", torch.nn.Parameter(torch.zeros(2)))], [
            {"pattern": "b", "optimizer_name": "adamw", "optimizer_kwargs": {}}])


def torchtitan_init_step(optimizer):
    """torchtitan 0.3's `init_optim_state` restated: zero gradients, every group's lr 0, one step, lr restored."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", apollo.optimizer_names())
def test_init_step_creates_all_state_and_moves_nothing(tiny_llama, name):
    """torchtitan restores only the state keys its init step created: every optimizer must create all of them
    on its first step, and that zero-gradient lr=0 step must leave the weights alone (decay included)."""
    model = copy.deepcopy(tiny_llama)
    try:
        optimizer = apollo.build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    except ImportError as error:  # adamw8bit without bitsandbytes
        pytest.skip(str(error))
    torchtitan_init_step(optimizer)
    for p, q in zip(model.parameters(), tiny_llama.parameters()):
        assert torch.equal(p, q)
    after_init = {n: sorted(optimizer.state[p]) for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    assert {n: sorted(optimizer.state[p]) for n, p in model.named_parameters()} == after_init


def test_a_registered_optimizer_gets_its_plan_from_its_builder(monkeypatch, tiny_llama):
    """No table to edit: group_plan reads the groups a new spec's builder makes (here: SGD on the decoder
    matrices with momentum, plain SGD on the rest) and turns each into the FQN patterns of its kinds."""
    def build(model, lr, weight_decay=0.0, **options):
        matrices = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
        rest = [p for p in model.parameters() if all(p is not q for q in matrices)]
        return torch.optim.SGD([{"params": matrices, "momentum": options.get("momentum", 0.9), "name": "matrices"},
                                {"params": rest, "name": "rest"}], lr=lr, weight_decay=weight_decay)

    spec = apollo.OptimizerSpec("toy_sgd", build, frozenset({"momentum"}), "a toy", from_groups=torch.optim.SGD)
    monkeypatch.setitem(apollo.REGISTRY, "toy_sgd", spec)
    configs, constructor = titan_groups.group_plan("toy_sgd", 0.5, 0.1, momentum=0.8)
    assert [c["pattern"] for c in configs] == [titan_groups.LLAMA3.matrices, titan_groups._not(titan_groups.LLAMA3.matrices)]
    assert configs[0]["optimizer_kwargs"]["momentum"] == 0.8 and configs[1]["optimizer_kwargs"]["momentum"] == 0
    assert constructor == {}
    groups = titan_groups.route([(n, torch.nn.Parameter(torch.zeros(1))) for n in LLAMA3_NAMES], configs)["toy_sgd"]
    assert [g["param_names"] for g in groups] == [LLAMA3_NAMES[1:6], [LLAMA3_NAMES[0]] + LLAMA3_NAMES[6:]]



def test_plans_need_no_transformers(monkeypatch):
    """A torchtitan environment has torch and no transformers (tests/apollo/test_torchtitan.py builds one): the
    plans come from a torch-only probe with transformers' LLaMA names, order and shapes, and equal the plans
    built over transformers' own LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch_probe = titan_groups._probe

    def transformers_probe(hidden_size, rank):
        config = LlamaConfig(**vars(torch_probe(hidden_size, rank).config))
        with torch.device("meta"):
            return LlamaForCausalLM(config)

    probe, reference = torch_probe(32, None), transformers_probe(32, None)
    assert [(n, p.shape) for n, p in probe.named_parameters()] == [(n, p.shape) for n, p in reference.named_parameters()]
    names = planned_names()
    assert len(names) == len(apollo.optimizer_names()) - 1
    with monkeypatch.context() as patch:
        patch.setattr(titan_groups, "_probe", transformers_probe)
        over_transformers = {name: titan_groups.group_plan(name, 1e-3, hidden_size=32) for name in names}
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError):
        import transformers  # noqa: F401
    for name in names:
        assert titan_groups.group_plan(name, 1e-3, hidden_size=32) == over_transformers[name], name
