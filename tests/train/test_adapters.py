"""The model-side rows (train/adapters.py): LoRA (peft, W0 frozen) and Low-Rank (W = s B A, no W0).

Checked against independent float64 re-derivations: the adapted layer's weight is written out as W0 + s B A
(or s B A) and pushed through the plain LLaMA with torch.func.functional_call; one AdamW step is Adam's
first-step closed form lr * g / (|g| + eps) on those gradients. Plus the counts' formulas, the inits, the
merge used by export, the refusals (one line, exit 2, nothing created) and 4-update CLI runs that resume
bit-exactly.
"""
import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

import apollo
from train import __main__ as cli
from train import adapters
from train.config import ConfigError, TrainConfig, resolve
from tests.train.test_cli import read_metrics, tiny_args, weights

R = 4


def adapter_config(adapter: str, **flags) -> TrainConfig:
    return TrainConfig(model_config="unused.json", batch_size=1, adapter=adapter, lora_rank=R, **flags)


def plain_targets(model) -> dict[str, tuple[int, int]]:
    """name -> (m, n) of every attention/MLP linear of an unadapted model."""
    return {name: tuple(module.weight.shape) for name, module in adapters.targets(model)}


def merged_weights(params, base_shapes, spec_name: str, scale: float) -> dict[str, torch.Tensor]:
    """The adapted model's parameters (a name -> tensor dict) rewritten as a plain LLaMA's: each target's weight
    = [W0 +] s B A (a graph from the factors, which stay the leaves that receive gradients)."""
    out = {}
    for name in base_shapes:
        if spec_name == "lora":
            w0 = params[f"{name}.base_layer.weight"]
            a, b = params[f"{name}.lora_A.default.weight"], params[f"{name}.lora_B.default.weight"]
            out[f"{name}.weight"] = w0 + scale * b @ a
        else:
            a, b = params[f"{name}.lora_A.weight"], params[f"{name}.lora_B.weight"]
            out[f"{name}.weight"] = scale * b @ a
    skip = tuple(f"{name}." for name in base_shapes)
    out.update({key: value for key, value in params.items() if not key.startswith(skip)})
    return out


@pytest.mark.parametrize("name", ["lora", "low_rank"])
def test_counts_shapes_and_what_is_trainable(name, tiny_llama):
    model = tiny_llama()
    shapes = plain_targets(model)
    total = sum(p.numel() for p in model.parameters())
    rest = total - sum(m * n for m, n in shapes.values())
    counts = adapters.apply_adapter(model, adapter_config(name, lora_dropout=0.0))
    factors = sum(R * (m + n) for m, n in shapes.values())
    frozen = sum(m * n for m, n in shapes.values()) if name == "lora" else 0
    assert len(shapes) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert counts == {"targets": 14, "factors": factors, "frozen": frozen, "trainable": rest + factors,
                      "total": rest + factors + frozen}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == rest + factors  # P_rest + sum r (m + n)
    params = dict(model.named_parameters())
    suffix = ".default.weight" if name == "lora" else ".weight"
    for target, (m, n) in shapes.items():
        assert params[f"{target}.lora_A{suffix}"].shape == (R, n)
        assert params[f"{target}.lora_B{suffix}"].shape == (m, R)
        assert (f"{target}.base_layer.weight" in params) == (name == "lora")
        assert f"{target}.weight" not in params
    frozen_names = sorted(key for key, p in params.items() if not p.requires_grad)
    assert frozen_names == (sorted(f"{t}.base_layer.weight" for t in shapes) if name == "lora" else [])
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.input_layernorm.weight"):
        assert params[key].requires_grad, key


def test_lora_with_b_zero_is_the_base_model_bit_for_bit(tiny_llama):
    base, model = tiny_llama(seed=3), tiny_llama(seed=3)
    adapters.apply_adapter(model, adapter_config("lora", lora_dropout=0.0))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens).logits, base(tokens).logits)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(64, R))
    a = layer.lora_A["default"].weight  # kaiming_uniform(a = sqrt 5) = U(+-1/sqrt n)
    assert a.abs().max() <= 1 / math.sqrt(64) and a.abs().max() > 0.9 / math.sqrt(64)
    assert layer.scaling["default"] == 32 / R


def test_low_rank_inits(tiny_llama):
    model = tiny_llama()
    adapters.apply_adapter(model, adapter_config("low_rank"))
    down = model.model.layers[1].mlp.down_proj  # 64 x 160
    assert down.lora_A.weight.abs().max() <= 1 / math.sqrt(160) and down.lora_A.weight.abs().max() > 0.9 / math.sqrt(160)
    assert down.lora_B.weight.abs().max() <= 1 / math.sqrt(R) and down.lora_B.weight.abs().max() > 0.5 / math.sqrt(R)
    assert down.scale == 32 / R and isinstance(down.lora_dropout, torch.nn.Dropout) and down.lora_dropout.p == 0.05
    zeroed = tiny_llama()
    adapters.apply_adapter(zeroed, adapter_config("low_rank", lora_init="zero_b", lora_alpha=8.0))
    assert torch.equal(zeroed.model.layers[1].mlp.down_proj.lora_B.weight, torch.zeros(64, R))
    assert zeroed.model.layers[1].mlp.down_proj.scale == 2.0


@pytest.mark.parametrize("name", ["lora", "low_rank"])
def test_one_adamw_step_against_float64_rederivation(name, tiny_llama):
    """AdamW's first step is lr * g / (|g| + eps) on every trained tensor (bias correction cancels); the gradient
    comes from the plain LLaMA with W = [W0 +] s B A written out; W0 does not move."""
    model, plain = tiny_llama(dtype=torch.float64), tiny_llama(dtype=torch.float64)
    shapes = plain_targets(model)
    adapters.apply_adapter(model, adapter_config(name, lora_dropout=0.0, lora_alpha=16.0))
    with torch.no_grad():  # B != 0, so that A receives a gradient too
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn_like(param) * 0.05)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    scale, lr, eps = 16.0 / R, 1e-3, 1e-8

    leaves = {key: p.detach().clone().requires_grad_(p.requires_grad) for key, p in model.named_parameters()}
    merged = merged_weights(leaves, shapes, name, scale)
    expected_loss = functional_call(plain, merged, (tokens,), {"labels": tokens}).loss
    expected_loss.backward()

    optimizer = apollo.build_optimizer("adamw", model, lr=lr, betas=(0.9, 0.999), eps=eps)
    loss = model(tokens, labels=tokens).loss
    assert torch.allclose(loss, expected_loss, rtol=0, atol=1e-12)
    loss.backward()
    before = {key: p.detach().clone() for key, p in model.named_parameters()}
    optimizer.step()
    moved = 0
    for key, param in model.named_parameters():
        grad = leaves[key].grad
        if grad is None:
            assert "base_layer" in key and torch.equal(param, before[key]), key  # W0: frozen, untouched
            continue
        assert torch.allclose(param.grad, grad, rtol=1e-9, atol=1e-14), key
        expected = before[key] - lr * grad / (grad.abs() + eps)
        assert torch.allclose(param, expected, rtol=0, atol=1e-12), key
        moved += "lora_" in key and not torch.equal(param, before[key])
    assert moved == 2 * len(shapes)  # every A and B moved


@pytest.mark.parametrize("name", ["lora", "low_rank"])
def test_merged_state_dict_is_a_plain_llama_with_the_same_logits(name, tiny_llama):
    model = tiny_llama(dtype=torch.float64)
    adapters.apply_adapter(model, adapter_config(name, lora_dropout=0.0))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn_like(param) * 0.05)
    config = dataclasses.asdict(adapter_config(name, lora_dropout=0.0))
    state = adapters.merge_state_dict(model.state_dict(), config)
    plain = tiny_llama(seed=9, dtype=torch.float64)
    assert sorted(state) == sorted(plain.state_dict())
    plain.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    model.eval()
    assert torch.allclose(plain(tokens).logits, model(tokens).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("flags, message", [
    ({"lora_rank": 8}, "--lora_rank needs --adapter lora or low_rank"),
    ({"lora_dropout": 0.1}, "--lora_dropout needs --adapter lora or low_rank"),
    ({"adapter": "lora"}, "--adapter lora needs --lora_rank (the rank r of its factors)"),
    ({"adapter": "low_rank", "lora_rank": 8, "weight_quant": True, "optimizer": "apollo"},
     "--adapter low_rank does not combine with --weight_quant: int8 weights cannot carry adapters (the factors would "
     "sit on quantised layers); drop --weight_quant"),
    ({"adapter": "lora", "lora_rank": 8, "optimizer": "galore"},
     "--adapter lora does not work with --optimizer galore: it projects the attention/MLP gradients to a rank of its "
     "own, and the adapters already factor those weights (the published rows train them with adamw)"),
])
def test_resolve_refusals(flags, message):
    with pytest.raises(ConfigError) as error:
        resolve(TrainConfig(model_config="unused.json", batch_size=1, **flags))
    assert str(error.value) == message


def test_every_rank_taking_optimizer_is_refused_and_the_rest_compose():
    for name in apollo.optimizer_names():
        refusal = adapters.refusal(adapter_config("lora", optimizer=name))
        assert (refusal is not None) == ("rank" in apollo.get_spec(name).options), name


def test_rank_not_below_min_side_is_one_line_before_anything_exists(tmp_path, c4_dir, tokenizer_dir, capsys):
    run = tmp_path / "run"
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, adapter="low_rank", lora_rank=32)  # tiny CLI model: hidden 32
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --lora_rank 32 must be smaller than min(m, n) = 32 of model.layers.0.self_attn.q_proj "
                   "(32 x 32): a rank that large is no compression"), err
    assert not run.exists()


@pytest.fixture(scope="module", params=["lora", "low_rank"])
def adapter_run(request, tmp_path_factory, c4_dir, tokenizer_dir):
    """A 4-update AdamW run with dropout on (checkpoints at 2 and 4), in this process."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", adapter=name, lora_rank=R, num_training_steps=4,
                     save_every=2, eval_every=4)
    assert cli.main(argv) == 0
    return {"name": name, "folder": folder, "run": folder / "run", "argv": argv}


def test_cli_run_trains_the_factors_and_resumes_bit_exactly(adapter_run):
    run, name = adapter_run["run"], adapter_run["name"]
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    final = weights(run / "step_0000004")
    suffix = ".default.weight" if name == "lora" else ".weight"
    assert f"model.layers.0.self_attn.q_proj.lora_A{suffix}" in final
    if name == "lora":  # W0 is saved, and never moved from its init (the step-2 checkpoint holds the same)
        key = "model.layers.0.self_attn.q_proj.base_layer.weight"
        assert torch.equal(final[key], weights(run / "step_0000002")[key])
    resumed = adapter_run["folder"] / "resumed"
    argv = adapter_run["argv"] + ["--continue_from", str(run / "step_0000002"), "--save_dir", str(resumed)]
    assert cli.main(argv) == 0
    got = weights(resumed / "step_0000004")
    assert final.keys() == got.keys()
    for key in final:  # dropout masks included: the RNG is restored after the loader's start-up draws
        assert torch.equal(final[key], got[key]), f"{name}: {key}"
    assert [r["loss"] for r in read_metrics(resumed) if "loss" in r] == losses[2:]


def test_export_is_a_plain_llama_with_the_trained_logits(adapter_run, tmp_path):
    """train.export merges the factors: from_pretrained gives a plain LlamaForCausalLM (no peft layer, no adapter
    key) whose logits are the trained model's (float32 run: the merged W rounds once, so to ~1e-6)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from train import export
    from train.model import build_model

    run, name = adapter_run["run"], adapter_run["name"]
    out = tmp_path / "hf"
    assert export.main([str(run), "--out", str(out)]) == 0
    assert not [key for key in load_file(out / "model.safetensors") if "lora" in key or "base_layer" in key]
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    trained = build_model(adapter_run["folder"] / "llama_tiny.json")
    adapters.apply_adapter(trained, adapter_config(name))
    trained.load_state_dict(weights(run / "step_0000004"))
    trained.eval()
    tokens = torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(tokens).logits, exported(tokens).logits
    assert torch.allclose(got, expected, rtol=0, atol=2e-5), (got - expected).abs().max()
    assert not torch.equal(expected, build_model(adapter_run["folder"] / "llama_tiny.json")(tokens).logits)


def test_study_rows_are_an_optimizer_plus_model_side_flags(tmp_path):
    """[optimizers.ROW] with `optimizer = NAME` and adapter flags: its runs are named by the row, train that
    optimizer with the adapter, resolve as `python -m train` does; the report labels them optimizer+adapter."""
    from tests.train.test_study import parse_flags, write_spec
    from train import study
    from train.study.report import row_label
    from train.study.spec import load_spec

    spec = load_spec(write_spec(tmp_path, optimizers="""[optimizers.adamw]
lr = [0.01]
[optimizers.lora]
optimizer = "adamw"
adapter = "lora"
lora_rank = 4
lr = [0.01, 0.003]
[optimizers.low-rank]
optimizer = "adamw"
adapter = "low_rank"
lora_rank = [2, 4]
lr = [0.01]"""))
    planned, _ = study.plan(spec, lambda run: False)
    runs = {run.name: parse_flags(run.flags) for run in planned["tune"]}
    assert len(runs) == (1 + 2 + 2) * 2  # two budgets
    lora = {name: flags for name, flags in runs.items() if "-lora-" in name}
    assert len(lora) == 4 and all(f["--optimizer"] == "adamw" and f["--adapter"] == "lora" and f["--lora_rank"] == "4"
                                  for f in lora.values())
    assert sorted(f["--lora_rank"] for n, f in runs.items() if "-low-rank-" in n) == ["2", "2", "4", "4"]
    assert not any("--adapter" in f for n, f in runs.items() if "-adamw-" in n)
    assert row_label({"optimizer": "adamw", "adapter": "lora"}) == "adamw+lora"
    assert row_label({"optimizer": "adamw", "adapter": "none"}) == "adamw"
    assert row_label({"optimizer": "adamw", "adapter": "lora", "relora": None, "relora_cycles": 3}) == "adamw+relora"
    assert row_label({"optimizer": "adamw", "adapter": "lora", "relora": 26, "relora_cycles": None}) == "adamw+relora"
    assert row_label({"optimizer": "adamw", "adapter": "lora", "relora": None, "relora_cycles": None}) == "adamw+lora"


def test_study_row_refused_by_the_trainer_is_one_line(tmp_path):
    from tests.train.test_study import write_spec
    from train.study.spec import StudyError, load_spec

    with pytest.raises(StudyError) as error:
        load_spec(write_spec(tmp_path, optimizers="""[optimizers.galore-lora]
optimizer = "galore"
adapter = "lora"
lora_rank = 4
lr = [0.01]"""))
    assert str(error.value).endswith("--adapter lora does not work with --optimizer galore: it projects the "
                                     "attention/MLP gradients to a rank of its own, and the adapters already factor "
                                     "those weights (the published rows train them with adamw)"), str(error.value)
    with pytest.raises(StudyError, match=r"^optimizers.x: optimizer = 'adamx' is unknown \(one of "):
        load_spec(write_spec(tmp_path, optimizers='[optimizers.x]\noptimizer = "adamx"\nlr = [0.01]'))


ADAPTER_RECIPES = [f"llama_{size}_{row}" for size in ("60m", "130m", "350m", "1b") for row in ("lora", "low_rank")]


@pytest.mark.parametrize("stem", [stem if stem == "llama_60m_lora" else pytest.param(stem, marks=pytest.mark.slow)
                                  for stem in ADAPTER_RECIPES])
def test_recipe_trains_a_few_updates_on_the_tiny_model(stem, tmp_path, c4_dir, tokenizer_dir, monkeypatch):
    """The recipe's own command (PRINT_COMMAND=1) with the model, batch and steps overridden on its command line
    trains 2 updates; its published settings (r of its size, alpha 32, dropout 0.05, AdamW eps 1e-8) reach the run."""
    from tests.train.test_cli import write_tiny_config
    from tests.train.test_recipes import SCRIPTS, _launch_command

    env = {"DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "WANDB_MODE": "disabled", "NGPU": "1"}
    command = _launch_command(SCRIPTS / f"{stem}.sh", env)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    rank = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}[stem.split("_")[1]]
    assert command[command.index("--lora_rank") + 1] == str(rank)
    overrides = ["--model_config", str(write_tiny_config(tmp_path)), "--lora_rank", "4", "--batch_size", "2",
                 "--gradient_accumulation", "1", "--total_batch_size", "2", "--max_length", "32",
                 "--num_training_steps", "2", "--warmup_steps", "1", "--eval_every", "2", "--save_every", "2",
                 "--eval_tokens", "200", "--workers", "0", "--dtype", "float32", "--save_dir", str(tmp_path / "run")]
    assert cli.main(command[6:] + overrides) == 0
    import json
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["optimizer"], config["adapter"]) == ("adamw", stem.split("_", 2)[2])
    assert (config["lora_alpha"], config["lora_dropout"], config["eps"], config["lr"]) == (32.0, 0.05, 1e-8, 0.001)
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 2


TARGET_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", [pytest.param("lora", marks=pytest.mark.slow), "low_rank"])  # our LoRA is peft's
def test_ten_adam_steps_match_peft_get_peft_model(name, tiny_llama):
    """PEERS.md's parity oracles: peft's get_peft_model (LoraConfig r, alpha 32, dropout 0, the 7 projections) on a
    float64 LLaMA with embed_tokens, the norms and lm_head trainable again; for Low-Rank every target W0 set to 0
    (W = s B A exactly). Our factors (and W0) are copied in, torch.optim.Adam on both: losses and weights agree
    for 10 steps."""
    from peft import LoraConfig, get_peft_model

    ours = tiny_llama(seed=5, dtype=torch.float64)
    adapters.apply_adapter(ours, adapter_config(name, lora_dropout=0.0))
    reference = get_peft_model(tiny_llama(seed=5, dtype=torch.float64), LoraConfig(
        r=R, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_NAMES, bias="none",
        init_lora_weights=name == "lora"))
    theirs = reference.base_model.model
    with torch.no_grad():
        for key, param in ours.named_parameters():
            if "lora_" in key:  # A, B (B random, so that both factors move from step 1)
                param.copy_(torch.randn_like(param) * 0.05)
        target = dict(theirs.named_parameters())
        for key, param in theirs.named_parameters():
            if name == "low_rank" and key.endswith("base_layer.weight"):
                param.zero_()
            param.requires_grad_("base_layer" not in key)
        for key, param in ours.named_parameters():
            their_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                       ".lora_B.default.weight")
            target[their_key].copy_(param)
    trained = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    assert [p.shape for p in trained(ours)] == [p.shape for p in trained(theirs)]
    opt_ours, opt_theirs = torch.optim.Adam(trained(ours), lr=1e-3), torch.optim.Adam(trained(theirs), lr=1e-3)
    start = [p.detach().clone() for p in trained(ours)]
    generator = torch.Generator().manual_seed(4)
    for _ in range(10):
        tokens = torch.randint(0, 256, (2, 16), generator=generator)
        losses = []
        for model, optimizer in ((ours, opt_ours), (reference, opt_theirs)):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-12, abs=0)
    for mine, other in zip(trained(ours), trained(theirs)):
        assert torch.allclose(mine, other, rtol=0, atol=1e-10)
    moved = [not torch.equal(p, p0) for p, p0 in zip(trained(ours), start)]
    assert sum(moved) >= len(moved) - 1  # every trained tensor moved (embedding row 0, the pad, may not)


@pytest.mark.parametrize("optimizer", apollo.optimizer_names())
@pytest.mark.parametrize("name", ["lora", pytest.param("low_rank", marks=pytest.mark.slow)])
def test_every_optimizer_composes_or_is_refused(optimizer, name, tiny_llama):
    """A registered optimizer either takes a rank of its own (refused, one line) or trains the adapters: two steps
    at its smoke settings move the factors (every B, or with B = 0 at least the Bs) and never W0."""
    config = adapter_config(name, optimizer=optimizer, lora_dropout=0.0)
    if adapters.refusal(config):
        assert "rank" in apollo.get_spec(optimizer).options
        return
    model = tiny_llama()
    adapters.apply_adapter(model, config)
    spec = apollo.get_spec(optimizer)
    opt = apollo.build_optimizer(optimizer, model, lr=spec.smoke_lr, **dict(spec.smoke_options))
    before = {key: p.detach().clone() for key, p in model.named_parameters()}
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[key], before[key]) for key in params if "base_layer" in key)
    moved = [key for key in params if "lora_B" in key and not torch.equal(params[key], before[key])]
    assert len(moved) == 14, (optimizer, len(moved))


def test_dry_run_prints_the_adapter_and_its_memory(tmp_path, c4_dir, tokenizer_dir, capsys):
    run = tmp_path / "run"
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, adapter="lora", lora_rank=4, dry_run=True)) == 0
    out = capsys.readouterr().out
    # the tiny CLI model: h 32, I 64, 2 layers: F = 2 (4 x 4 x 64 + 3 x 4 x 96) = 4352, W0 = 2 (4 x 32^2 + 3 x 64 x 32)
    line = next(line for line in out.splitlines() if line.startswith("adapter: "))
    assert line == ("adapter: lora on 14 attention/MLP linears: r 4, alpha 32 (s 8), dropout 0.05, init zero_b; "
                    "factors 4,352 values, trainable 2.06M values, frozen W0 20,480 values (no grad, no optimizer "
                    "state)"), line
    assert "memory per process (estimate, float32" in out and not run.exists()
