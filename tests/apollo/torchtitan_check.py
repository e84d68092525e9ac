"""Run inside a torchtitan 0.3 environment (tests/apollo/test_torchtitan.py builds one): prints one JSON line.

On torchtitan's Llama-3 debug model (dim 256, 6 layers, vocab 2048), for APOLLO and APOLLO-Mini:

1. ``equal_max_abs``: the largest |difference| between the weights after 4 steps through
   `ApolloOptimizersContainer` (built from `optimizer_config`, torchtitan's real container) and 4 steps
   through `apollo.build_optimizer` on an identical copy, the same seeded gradients (update_proj_gap 2,
   so a projection refresh is crossed); ``same_groups``: the two optimizers' groups hold the same
   parameters in the same order.
2. ``resume_max_abs``: after 3 steps, the container's flat FQN-keyed state dict goes through DCP
   (``dcp.save``; a fresh model copy + container runs ``state_dict()``, i.e. torchtitan's zero-gradient
   lr=0 init step, then ``dcp.load`` and ``load_state_dict``); both then take 3 more steps with the
   same gradients: the largest |difference| of weights and of every state tensor. ``flat_keys``: the
   number of entries of the flat state dict; ``init_moved``: whether the init step changed a weight.

3. ``jobs``: the two job configs loaded by torchtitan's ``ConfigManager`` (``--module
   apollo.integrations.torchtitan --config ...``, a CLI override), their containers built on the model.

Gradients are seeded random tensors (no forward pass): the optimizer path is what is compared, and
torchtitan's trainer needs CUDA-only pieces (FlexAttention, device memory calls) on this CPU.
"""
import copy
import json
import sys
import tempfile

import torch
import torch.distributed.checkpoint as dcp
from torchtitan.models.llama3 import model_registry

import apollo
from apollo.integrations.torchtitan import optimizer_config

RANKS = {"apollo": 64, "apollo_mini": 1}  # the presets' ranks: a quarter of dim 256, and 1


def base_model() -> torch.nn.Module:
    model = model_registry("debugmodel").model.build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02 if param.dim() > 1 else torch.ones_like(param))
    return model


def set_grads(models, generator) -> None:
    for params in zip(*(m.parameters() for m in models)):
        grad = torch.randn(params[0].shape, generator=generator)
        for p in params:
            p.grad = grad.clone()


def max_abs(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def check(name: str, model: torch.nn.Module) -> dict:
    options = {"rank": RANKS[name], "update_proj_gap": 2}
    titan_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    container = optimizer_config(name, lr=1e-2, weight_decay=0.1, **options).build(model_parts=[titan_model])
    reference = apollo.build_optimizer(name, ref_model, lr=1e-2, weight_decay=0.1,
                                       target_modules=("attention", "feed_forward"), **options)
    (titan,) = container.optimizers
    position = {id(p): i for i, p in enumerate(titan_model.parameters())}
    ref_position = {id(p): i for i, p in enumerate(ref_model.parameters())}
    same_groups = [[position[id(p)] for p in g["params"]] for g in titan.param_groups] == \
        [[ref_position[id(p)] for p in g["params"]] for g in reference.param_groups]
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        set_grads([titan_model, ref_model], generator)
        container.step()
        reference.step()
    result = {"same_groups": same_groups, "equal_max_abs": max_abs(titan_model, ref_model),
              "low_rank_tensors": len(titan.param_groups[1]["params"])}

    # DCP round trip: checkpoint after 3 steps, restore into a fresh container, continue both.
    config = optimizer_config(name, lr=1e-2, weight_decay=0.1, **options)
    first_model = copy.deepcopy(model)
    first = config.build(model_parts=[first_model])
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        set_grads([first_model], generator)
        first.step()
    first.zero_grad()
    with tempfile.TemporaryDirectory() as folder:
        saved = first.state_dict()
        dcp.save(saved, checkpoint_id=folder)
        second_model = copy.deepcopy(first_model)
        second = config.build(model_parts=[second_model])
        template = second.state_dict()  # torchtitan's zero-gradient, lr=0 init step happens here
        init_moved = max_abs(first_model, second_model) != 0.0
        dcp.load(template, checkpoint_id=folder)
        second.load_state_dict(template)
    for _ in range(3):
        set_grads([first_model, second_model], generator)
        first.step()
        second.step()
    state_diff = 0.0
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys(), sorted(set(one) ^ set(two))[:5]
    for key, value in one.items():
        if isinstance(value, torch.Tensor):
            state_diff = max(state_diff, (value.float() - two[key].float()).abs().max().item())
        elif value != two[key]:
            state_diff = float("inf")
    result.update(flat_keys=len(saved), init_moved=init_moved,
                  resume_max_abs=max(max_abs(first_model, second_model), state_diff))
    return result


def job_configs(model: torch.nn.Module) -> dict:
    """The `--module apollo.integrations.torchtitan --config ...` jobs as torchtitan's ConfigManager loads them."""
    from torchtitan.config import ConfigManager

    result = {}
    for name in ("apollo_llama3_debugmodel", "apollo_mini_llama3_debugmodel"):
        config = ConfigManager().parse_args(["--module", "apollo.integrations.torchtitan", "--config", name,
                                             "--training.steps", "3"])
        container = config.optimizer.build(model_parts=[copy.deepcopy(model)])
        result[name] = {"container": type(container).__name__, "steps": config.training.steps,
                        "optimizers": [type(o).__name__ for o in container],
                        "ranks": [g.get("rank") for g in container.optimizers[0].param_groups]}
    return result


def main() -> None:
    model = base_model()
    report = {"torch": torch.__version__, "apollo_file": apollo.__file__, "params": sum(p.numel() for p in model.parameters())}
    report["jobs"] = job_configs(model)
    for name in RANKS:
        report[name] = check(name, model)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
