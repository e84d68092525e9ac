"""apollo.hf: target selection on several architectures, the three Trainer routes, and exact Trainer resume."""
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import apollo
from apollo import hf, routing

# one size dict for the LLaMA here and the other families' configs (Qwen2, Mistral, Gemma, Phi-3 take these
# keys), with the special token ids (0, 1, 2) the Trainer tests' batches leave out
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).to(dtype)


def layer_names(layers: int, suffixes: list[str], prefix: str = "model.layers") -> list[str]:
    return [f"{prefix}.{i}.{suffix}.weight" for i in range(layers) for suffix in suffixes]


def give_gradients(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


# ------------------------------------------------------------------------------ target selection

ARCHITECTURES = {
    "qwen2": (transformers.Qwen2Config, {}, LLAMA_LINEARS),
    "mistral": (transformers.MistralConfig, {}, LLAMA_LINEARS),
    "gemma": (transformers.GemmaConfig, {"head_dim": 8, "num_key_value_heads": 1}, LLAMA_LINEARS),  # tied lm_head
    "phi3": (transformers.Phi3Config, {}, ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj",
                                           "mlp.down_proj"]),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_all_linear_selects_every_projection_and_not_the_head(arch):
    config_class, extra, suffixes = ARCHITECTURES[arch]
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**TINY, **extra}))
    names = hf.select_targets(model, "all-linear")
    assert names == layer_names(2, suffixes)
    assert len(names) == 2 * len(suffixes)  # 14 for Qwen2/Mistral/Gemma, 8 for Phi-3's fused projections
    assert hf.select_targets(model, "all_linear") == names
    head = model.get_output_embeddings().weight
    groups = hf.param_groups(model, "all-linear", rank=2)
    low_rank = next(g for g in groups if g["name"] == "low_rank")["params"]
    assert all(p is not head for p in low_rank)
    assert (head is model.get_input_embeddings().weight) == (arch == "gemma")
    # every trainable tensor exactly once; 1-D tensors (norms, Qwen2's q/k/v biases) without decay
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    no_decay = next(g for g in groups if g["name"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_gpt2_conv1d_weights_are_low_rank_and_projected_along_their_long_side():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                                                 n_positions=32))
    names = hf.select_targets(model)
    assert names == layer_names(2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "transformer.h")
    optimizer = hf.build("apollo", model, lr=1e-2, rank=4)
    give_gradients(model, 0)
    optimizer.step()
    weights = dict(model.named_parameters())
    # Conv1D stores in x out: c_attn (32, 96) keeps its 96 output channels, c_proj of the MLP (128, 32) its 128 inputs
    assert optimizer.state[weights["transformer.h.0.attn.c_attn.weight"]]["exp_avg"].shape == (4, 96)
    assert optimizer.state[weights["transformer.h.0.mlp.c_proj.weight"]]["exp_avg"].shape == (128, 4)
    assert optimizer.state[weights["transformer.wte.weight"]]["exp_avg"].shape == (64, 32)  # the tied head: AdamW


def test_target_specs_follow_transformers_matching_rules():
    from transformers.trainer_utils import check_target_module_exists

    model = tiny_llama()
    specs = [r".*\.(q|v)_proj", "q_proj", ["q_proj", "mlp"], ["model.layers.0.self_attn.o_proj"],
             [r"model\.layers\.1\..*_proj"], ["lm_head"], r".*"]
    for spec in specs:  # our matcher agrees with transformers' on every module name
        for name, _ in model.named_modules():
            assert routing.name_matches(spec, name) == check_target_module_exists(spec, name), (spec, name)
    assert hf.select_targets(model, r".*\.(q|v)_proj") == layer_names(2, ["self_attn.q_proj", "self_attn.v_proj"])
    assert hf.select_targets(model, ["q_proj", "mlp"]) == layer_names(2, ["self_attn.q_proj", "mlp.gate_proj",
                                                                          "mlp.up_proj", "mlp.down_proj"])
    assert hf.select_targets(model, ["model.layers.0.self_attn.o_proj"]) == ["model.layers.0.self_attn.o_proj.weight"]
    assert hf.select_targets(model, [r"model\.layers\.1\..*_proj"]) == layer_names(2, LLAMA_LINEARS)[7:]
    assert hf.select_targets(model, ["lm_head"]) == ["lm_head.weight"]  # named explicitly: allowed
    assert hf.select_targets(model, r".*") == layer_names(2, LLAMA_LINEARS) + ["lm_head.weight"]
    # a string is a whole-name regex: "q_proj" names no module, and selecting nothing is an error
    with pytest.raises(ValueError, match=r"^target_modules 'q_proj' selects no trainable 2-D weight"):
        hf.select_targets(model, "q_proj")
    with pytest.raises(ValueError, match="selects no trainable"):
        hf.select_targets(model, ["model.norm"])  # matches, but an RMSNorm is no linear layer
    with pytest.raises(ValueError, match="target_modules must be"):
        hf.select_targets(model, 3)


def test_decay_split_is_trainers():
    model = tiny_llama()
    trainer_decay = set(transformers.Trainer.get_decay_parameter_names(None, model))  # its rule, unbound (self unused)
    groups = hf.param_groups(model, "all-linear", weight_decay=0.1, rank=2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == trainer_decay and len(decayed) == 14 + 2  # projections, embedding, lm_head


# ----------------------------------------------------------------------------- the builder itself


@pytest.mark.parametrize("name,options", [("apollo", {"rank": 4}), ("apollo_mini", {}), ("apollo_svd", {"rank": 4}),
                                          ("galore", {"rank": 4})])
def test_without_weight_decay_equals_build_optimizer(name, options):
    """Same low-rank weights in the same positions: the same random projections, bit for bit."""
    a, b = tiny_llama(), tiny_llama()
    ours = hf.build(name, a, lr=1e-2, update_proj_gap=2, **options)
    theirs = apollo.build_optimizer(name, b, lr=1e-2, update_proj_gap=2, **options)
    for step in range(3):  # a refresh at steps 1 and 3
        give_gradients(a, step), give_gradients(b, step)
        ours.step(), theirs.step()
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), key


@pytest.mark.parametrize("name", ["apollo", "galore", "adamw"])
def test_weight_decay_is_decoupled_and_skips_1d_tensors(name):
    """Ours: W <- (W - k S)(1 - lr λ) (decay after the update); torch's AdamW: W <- W (1 - lr λ) - k S (before).

    Against the same step with λ = 0: every 2-D tensor moves by exactly that, every 1-D tensor not at all.
    """
    lr, decay = 1e-2, 0.1
    options = {"rank": 4} if name != "adamw" else {}
    runs = []
    for weight_decay in (0.0, decay):
        model = tiny_llama(dtype=torch.float64)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = hf.build(name, model, lr=lr, weight_decay=weight_decay, **options)
        give_gradients(model, 0)
        optimizer.step()
        runs.append(dict(model.named_parameters()))
    plain, decayed = runs
    for key in plain:
        if plain[key].dim() == 1:
            assert torch.equal(plain[key], decayed[key]), key
        else:
            expected = plain[key] - lr * decay * (start[key] if name == "adamw" else plain[key])
            torch.testing.assert_close(decayed[key], expected, rtol=1e-12, atol=1e-16)


def test_unknown_options_and_misplaced_targets_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"optimizer 'galore' does not take option\(s\) scale_type"):
        hf.build("galore", model, lr=1e-2, rank=4, scale_type="tensor")
    with pytest.raises(ValueError, match="target_modules applies to apollo, apollo_mini, apollo_svd, galore only"):
        hf.build("adamw", model, lr=1e-2, target_modules="all-linear")
    with pytest.raises(ValueError, match="unknown optimizer"):
        hf.build("lion", model, lr=1e-2)


# -------------------------------------------------------------------- TrainingArguments, LLaMA-Factory


def training_args(tmp_path, **fields) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=1e-2, weight_decay=0.1)
    return TrainingArguments(**{**base, **fields})


def test_parse_optim_args_reads_like_transformers():
    from transformers.trainer_optimizer import _parse_optim_args

    text = "rank=1, scale=128,scale_type=tensor , proj=random"
    assert hf.parse_optim_args(text) == _parse_optim_args(text) == {"rank": "1", "scale": "128", "scale_type": "tensor",
                                                                    "proj": "random"}
    assert hf.parse_optim_args(None) == hf.parse_optim_args("") == {}
    with pytest.raises(ValueError, match=r"optim_args 'rank=1,scale': 'scale' is not key=value"):
        hf.parse_optim_args("rank=1,scale")


def test_every_optim_args_key_and_training_argument_reaches_the_optimizer(tmp_path):
    args = training_args(tmp_path, optim="apollo_adamw", optim_target_modules=["q_proj", "v_proj"], weight_decay=0.05,
                         learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                         optim_args="rank=2,update_proj_gap=3,scale=4,proj=svd,proj_type=left,scale_type=tensor,"
                                    "scale_front=true,norm_growth_limiter=false,norm_growth_gamma=1.5,"
                                    "store_projection=true,fused=false,state_dtype=float32")
    factory, kwargs = hf.from_training_args(args)
    optimizer = factory()(tiny_llama(), **kwargs)
    low_rank = next(g for g in optimizer.param_groups if g["name"] == "low_rank")
    expected = {"rank": 2, "update_proj_gap": 3, "scale": 4.0, "proj": "svd", "proj_type": "left", "scale_type": "tensor",
                "scale_front": True, "norm_growth_limiter": False, "norm_growth_gamma": 1.5, "weight_decay": 0.05,
                "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-7, "store_projection": True, "state_dtype": "float32"}
    assert {k: low_rank[k] for k in expected} == expected
    assert type(low_rank["rank"]) is int and type(low_rank["scale"]) is float
    assert len(low_rank["params"]) == 4 and optimizer.fused is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0, 0.05]


def test_training_args_defaults_and_refusals(tmp_path):
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim="apollo_adamw"))
    # transformers' own apollo_adamw defaults, and the fields it drops (weight decay) kept
    assert kwargs == {"name": "apollo", "lr": 1e-2, "weight_decay": 0.1,
                      "rank": 128, "proj": "random", "scale_type": "channel", "update_proj_gap": 200, "scale": 1.0,
                      "proj_type": "std", "target_modules": "all-linear"}
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim="adamw_torch", optim_args="optimizer=apollo_mini"))
    assert kwargs["name"] == "apollo_mini" and "rank" not in kwargs and kwargs["target_modules"] == "all-linear"
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim="adamw_torch"))
    assert kwargs["name"] == "adamw" and "target_modules" not in kwargs
    refusals = {"galore_adamw_layerwise": (None, "builds joint optimizers only"),
                "adafactor": (None, r"optim='adafactor' is not one apollo.hf builds"),
                "apollo_adamw": ("rank=4,lr=1", r"optim_args lr=...: set TrainingArguments.learning_rate instead")}
    for optim, (optim_args, message) in refusals.items():
        with pytest.raises(ValueError, match=message):
            hf.from_training_args(training_args(tmp_path, optim=optim, optim_args=optim_args))
    with pytest.raises(ValueError, match="optim_args rank=four: must be an integer"):
        hf.from_training_args(training_args(tmp_path, optim="apollo_adamw", optim_args="rank=four"))
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim="apollo_adamw", optim_args="rank=4,colour=blue"))
    with pytest.raises(ValueError, match=r"does not take option\(s\) colour"):
        hf.OptimizerFactory()(tiny_llama(), **kwargs)


def test_llamafactory_keys_take_llamafactory_defaults(tmp_path):
    args = training_args(tmp_path)
    _, kwargs = hf.from_llamafactory({"use_apollo": True}, args)
    assert kwargs == {"name": "apollo", "lr": 1e-2, "weight_decay": 0.1,
                      "target_modules": "all-linear", "rank": 16, "update_proj_gap": 200, "scale": 32.0,
                      "proj": "random", "proj_type": "std", "scale_type": "channel", "scale_front": False}
    keys = SimpleNamespace(use_apollo=False, use_galore=True, galore_target="q_proj, v_proj", galore_rank=4)
    _, kwargs = hf.from_llamafactory(keys, args)
    assert kwargs == {"name": "galore", "lr": 1e-2, "weight_decay": 0.1,
                      "target_modules": ["q_proj", "v_proj"], "rank": 4, "update_proj_gap": 200, "scale": 2.0,
                      "proj_type": "std"}
    for keys, message in [({}, "neither use_apollo nor use_galore"), ({"use_apollo": True, "use_galore": True}, "exactly one"),
                          ({"use_apollo": True, "apollo_layerwise": True}, "set apollo_layerwise false")]:
        with pytest.raises(ValueError, match=message):
            hf.from_llamafactory(keys, args)
    with pytest.raises(ValueError, match="runs with optim adamw_torch"):
        hf.from_llamafactory({"use_galore": True}, training_args(tmp_path, optim="adafactor"))


# ------------------------------------------------------------------------- Trainer: the three routes

ROUTES = ("factory", "training_args", "llamafactory")
STEPS, SAVE = 3, 2  # update_proj_gap 2: projections refreshed at updates 1 and 3, on each side of the resume point
TRAINER_FIELDS = dict(max_steps=STEPS, save_steps=SAVE, save_strategy="steps", per_device_train_batch_size=4,
                      logging_steps=1, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)


def route_kwargs(route: str, name: str, folder) -> tuple[type, dict]:
    """The same optimizer through each route (the optimizer's own betas and eps in all three: TrainingArguments'
    are left at their defaults, which are not passed on)."""
    args = training_args(folder)
    common = {"lr": args.learning_rate, "weight_decay": args.weight_decay, "update_proj_gap": 2}
    if route == "factory":
        return hf.OptimizerFactory, {"name": name, **common, **({} if name == "apollo_mini" else {"rank": 4})}
    if route == "training_args":
        optim, optim_args, targets = {
            "apollo": ("apollo_adamw", "rank=4,update_proj_gap=2", "all-linear"),
            "apollo_mini": ("apollo_adamw", "rank=1,scale_type=tensor,scale=128,update_proj_gap=2", r".*\.\w+_proj"),
            "galore": ("galore_adamw", "rank=4,update_proj_gap=2", ["self_attn", "mlp"]),
        }[name]
        return hf.from_training_args(training_args(folder, optim=optim, optim_args=optim_args,
                                                   optim_target_modules=targets))
    keys = {
        "apollo": {"use_apollo": True, "apollo_rank": 4, "apollo_update_interval": 2, "apollo_scale": 1.0},
        "apollo_mini": {"use_apollo": True, "apollo_rank": 1, "apollo_update_interval": 2, "apollo_scale": 128,
                        "apollo_scale_type": "tensor", "apollo_target": "q_proj,k_proj,v_proj,o_proj,mlp"},
        "galore": {"use_galore": True, "galore_rank": 4, "galore_update_interval": 2, "galore_scale": 0.25},
    }[name]
    return hf.from_llamafactory(keys, args)


def dataset(n: int = 16, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, TINY["vocab_size"], (length,), generator=generator) for _ in range(n)]
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def train(output_dir, optimizer_cls_and_kwargs, resume=None) -> dict[str, torch.Tensor]:
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")
    model = tiny_llama(seed=1)
    args = training_args(output_dir, **TRAINER_FIELDS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == STEPS
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """optimizer name -> (run folder, final weights) of a 3-update factory-route run, checkpoint after update 2."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"trainer-{name}")
            cache[name] = (folder, train(folder, route_kwargs("factory", name, folder)))
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["apollo", "apollo_mini", "galore"])
def test_routes_build_the_same_optimizer(name, tmp_path):
    built = []
    for route in ROUTES:
        factory, kwargs = route_kwargs(route, name, tmp_path)
        optimizer = factory()(tiny_llama(), **kwargs)
        built.append([{k: (len(v) if k == "params" else v) for k, v in g.items()} for g in optimizer.param_groups])
    assert built[0] == built[1] == built[2]
    assert built[0][2]["rank"] == (1 if name == "apollo_mini" else 4) and built[0][2]["params"] == 14


CASES = [("factory", "apollo"), ("training_args", "apollo_mini"), ("llamafactory", "galore")]  # each route, each optimizer
SLOW_CASES = [(r, n) for r in ROUTES for n in ("apollo", "apollo_mini", "galore") if (r, n) not in CASES]


@pytest.mark.parametrize("route,name", CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_trainer_resume_is_bit_identical(route, name, uninterrupted, tmp_path):
    """Resume the factory run's checkpoint through `route`: the weights after update 3 equal the uninterrupted run's."""
    folder, expected = uninterrupted(name)
    checkpoint = folder / f"checkpoint-{SAVE}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer itself does on resume
    assert {g["name"] for g in state["param_groups"]} == {"regular", "no_decay", "low_rank"}
    got = train(tmp_path, route_kwargs(route, name, tmp_path), resume=str(checkpoint))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    moved = any(not torch.equal(expected[k], v) for k, v in tiny_llama(seed=1).state_dict().items())
    assert moved


@pytest.mark.slow
@pytest.mark.parametrize("route", ["training_args", "llamafactory"])
def test_each_route_trains_on_its_own_like_the_factory(route, uninterrupted, tmp_path):
    for name in ("apollo", "apollo_mini", "galore"):
        _, expected = uninterrupted(name)
        got = train(tmp_path / name, route_kwargs(route, name, tmp_path / name))
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)


def test_factory_is_what_transformers_calls_a_factory():
    from transformers.trainer_optimizer import is_optimizer_factory

    assert is_optimizer_factory(hf.OptimizerFactory) and not is_optimizer_factory(apollo.APOLLO)
    with pytest.raises(TypeError, match="lr"):
        hf.OptimizerFactory()(tiny_llama(), name="apollo")


def test_trainer_route_keeps_an_optimizers_own_betas_unless_changed(tmp_path, caplog):
    """SOAP's betas are (0.95, 0.95) and APOLLO's eps 1e-6: TrainingArguments' untouched defaults (0.9, 0.999,
    1e-8) must not replace them; betas the user changed are passed; an optimizer without eps refuses one."""
    model = tiny_llama()
    with caplog.at_level("INFO", logger="apollo.hf"):
        factory, kwargs = hf.from_training_args(training_args(tmp_path, optim_args="optimizer=soap"))
    assert "betas" not in kwargs and "eps" not in kwargs
    assert "soap with its own betas and eps" in caplog.text
    soap = factory()(model, **kwargs)
    assert soap.param_groups[0]["betas"] == (0.95, 0.95) and soap.param_groups[0]["eps"] == 1e-8
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim="apollo_adamw", optim_args="rank=4"))
    assert hf.OptimizerFactory()(model, **kwargs).param_groups[0]["eps"] == 1e-6   # APOLLO's own
    _, kwargs = hf.from_training_args(training_args(tmp_path, optim_args="optimizer=soap", adam_beta2=0.99))
    assert kwargs["betas"] == (0.9, 0.99) and "eps" not in kwargs
    assert factory()(model, **kwargs).param_groups[0]["betas"] == (0.9, 0.99)
    # an optimizer with no eps (simulated by a registry entry without it) refuses a changed adam_epsilon
    from dataclasses import replace
    entry = apollo.REGISTRY["scale"]
    apollo.REGISTRY["scale"] = replace(entry, options=entry.options - {"eps"})
    try:
        with pytest.raises(ValueError, match=r"^TrainingArguments.adam_epsilon is set but optimizer 'scale' has no "
                                             r"eps: leave it at its default$"):
            hf.from_training_args(training_args(tmp_path, optim_args="optimizer=scale", adam_epsilon=1e-6))
    finally:
        apollo.REGISTRY["scale"] = entry
