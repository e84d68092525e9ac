"""ReLoRA by parts (PEERS.md "### Parity oracles"): the jagged lr against hand-written tables, the merge keeps the
function, k merges sum their products into W0, pruning follows its rule on the moments only, the timetable,
the generator's state, the refusals."""
import copy
import math

import pytest
import torch

from train.relora import (RESET_RATIO, SEED_OFFSET, ReLoRA, ReLoRAError, check_optimizer_states, lora_layers,
                          lora_parameters, magnitude_prune_, merge_and_reinit, pruning_mode, prune_moments)
from train.schedule import jagged_cosine, lr_multiplier

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------- the jagged cosine

# N = 24, W1 = 2, Wr = 3, C = 6, rho = 0.1, q(x) = 0.1 + 0.45 (1 + cos(pi x)), N - W1 = 22; values typed from a
# calculator. GaLore's copy ramps to q(nC / 22), relora HEAD to q((nC + 3 - 2) / 22) and only once t >= C.
SETTINGS = dict(num_training_steps=24, warmup_steps=2, cycle_length=6, restart_warmup_steps=3, min_lr_ratio=0.1)
JAGGED = {  # t: (galore, relora_head)
    0: (0.0, 0.0),                    # first warmup t / W1
    1: (0.5, 0.5),
    2: (0.6666666667, 1.0),           # t = W1: k = 2 < Wr, n = 0 -> GaLore (2/3) q(0); HEAD: t < C, the cosine q(0)
    3: (0.9954196488, 0.9954196488),  # q(1/22)
    6: (0.0, 0.0),                    # t = C: the ramp opens at 0
    7: (0.2815624434, 0.2644294560),  # t = C + 1: (1/3) q(6/22) | (1/3) q(7/22)
    8: (0.5631248869, 0.5288589119),  # (2/3) q(6/22) | (2/3) q(7/22)
    9: (0.7932883679, 0.7932883679),  # t = C + Wr: the cosine again, q(7/22)
    12: (0.0, 0.0),                   # t = 2C
    13: (0.1619861076, 0.1410734498),  # (1/3) q(12/22) | (1/3) q(13/22)
    23: (0.1045803512, 0.1045803512),  # t = N - 1: q(21/22)
}


@pytest.mark.parametrize("variant", ["galore", "relora_head"])
def test_jagged_cosine_matches_hand_written_table(variant):
    column = 0 if variant == "galore" else 1
    got = {t: jagged_cosine(t, **SETTINGS, variant=variant) for t in JAGGED}
    assert got == pytest.approx({t: row[column] for t, row in JAGGED.items()}, abs=1e-10)
    # the same through lr_multiplier, as the loop calls it
    through = lr_multiplier(7, scheduler="cosine_restarts", num_training_steps=24, warmup_steps=2, cycle_length=6,
                            restart_warmup_steps=3, min_lr_ratio=0.1, restart_variant=variant)
    assert through == pytest.approx(JAGGED[7][column], abs=1e-10)


def test_jagged_cosine_adjust_step_shifts_the_restarts():
    """adjust_step 1: s = t + 1, so the restart is at t = 5 and t = 2 is already past the ramp: q(1/22)."""
    f = lambda t: jagged_cosine(t, **SETTINGS, adjust_step=1)
    assert (f(2), f(5), f(6)) == pytest.approx((0.9954196488, 0.0, 0.2815624434), abs=1e-10)


@pytest.mark.parametrize("overrides, variant, message", [
    ({"num_training_steps": 25}, "galore", "--num_training_steps 25 must be divisible by --cycle_length 6"),
    ({"warmup_steps": 6}, "galore", "--warmup_steps 6 + --adjust_step 0 must be < --cycle_length 6"),
    ({"warmup_steps": 5, "adjust_step": 2}, "relora_head", "--warmup_steps 5 + --adjust_step 2 must be <= --cycle_length 6"),
    ({"cycle_length": None}, "galore", "--scheduler cosine_restarts needs --cycle_length"),
    ({"restart_warmup_steps": 7}, "galore", "--restart_warmup_steps must be in [0, --cycle_length 6]"),
    ({}, "head", "restart variant must be one of galore, relora_head"),
])
def test_jagged_cosine_refuses_inconsistent_settings(overrides, variant, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        jagged_cosine(3, **{**SETTINGS, **overrides}, variant=variant)


def test_relora_head_allows_first_warmup_equal_to_the_cycle():
    """W1 = C = 6 (N - W1 = 18): the warmup ends where the first ramp opens; t = 7 is (1/3) q(3/18) =
    (0.1 + 0.45 (1 + cos(pi/6))) / 3."""
    f = lambda t: jagged_cosine(t, **{**SETTINGS, "warmup_steps": 6}, variant="relora_head")
    assert (f(5), f(6), f(7)) == pytest.approx((5 / 6, 0.0, 0.3132371439), abs=1e-10)


def re_escape(text):
    import re
    return re.escape(text)


# ----------------------------------------------------------------------------- a peft LoRA model

def lora_model(tiny_llama, *, rank=4, alpha=32, dtype=torch.float64):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(dtype=dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                        init_lora_weights=True)
    return get_peft_model(model, config)


def randomise_b(model, seed):
    """Nonzero B (peft starts it at 0) so a merge has something to move."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module, adapter in lora_layers(model):
            b = module.lora_B[adapter].weight
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)


def test_merge_keeps_the_function_float64(tiny_llama):
    model = lora_model(tiny_llama)
    randomise_b(model, 1)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=batch).logits
    assert merge_and_reinit(model, torch.Generator().manual_seed(3)) == 2 * len(TARGETS)
    with torch.no_grad():
        after = model(input_ids=batch).logits
    assert torch.allclose(before, after, rtol=0, atol=1e-12), (before - after).abs().max()
    assert before.abs().max() > 0.1  # a real output, not zeros


def test_k_merges_sum_their_products_into_w0(tiny_llama):
    model = lora_model(tiny_llama)
    layers = lora_layers(model)
    expected = {name: module.get_base_layer().weight.detach().clone() for name, module, _ in layers}
    generator = torch.Generator().manual_seed(11)
    shadow = torch.Generator().manual_seed(11)  # re-derives the new A: U(-1/sqrt(n), 1/sqrt(n)) in module order
    for j in range(3):
        randomise_b(model, 100 + j)
        for name, module, adapter in layers:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            assert module.scaling[adapter] == 32 / 4
            expected[name] = expected[name] + 8.0 * (b.detach() @ a.detach())
        merge_and_reinit(model, generator)
        for name, module, adapter in layers:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            bound = 1 / math.sqrt(a.shape[1])
            draw = torch.rand(a.shape, generator=shadow, dtype=torch.float64) * 2 * bound - bound
            assert torch.equal(module.get_base_layer().weight, expected[name]), name
            assert torch.allclose(a, draw, rtol=0, atol=1e-15) and a.abs().max() <= bound
            assert torch.count_nonzero(b) == 0


def test_merge_adds_in_w0_dtype_bfloat16(tiny_llama):
    model = lora_model(tiny_llama, dtype=torch.bfloat16)
    randomise_b(model, 5)
    name, module, adapter = lora_layers(model)[0]
    w0 = module.get_base_layer().weight.detach().clone()
    delta = (module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()) * module.scaling[adapter]
    merge_and_reinit(model, torch.Generator().manual_seed(0))
    assert module.get_base_layer().weight.dtype == torch.bfloat16
    assert torch.equal(module.get_base_layer().weight, w0 + delta.to(torch.bfloat16))


# ----------------------------------------------------------------------------- pruning

@pytest.fixture(scope="module")
def adamw_stepped():
    """(LoRA model, AdamW) after two steps, built once; tests take `copy.deepcopy` of the pair (the state stays
    keyed by the copied parameters)."""
    from tests.conftest import make_tiny_llama
    return stepped(make_tiny_llama)


def fresh(pair):
    return copy.deepcopy(pair)


def stepped(tiny_llama, optimizer_class=torch.optim.AdamW, **kwargs):
    """A LoRA model after two optimizer steps (B moved, so every factor has nonzero moments)."""
    model = lora_model(tiny_llama)
    for name, p in model.named_parameters():  # as the LoRA row: embeddings, norms and lm_head stay trainable
        if "base_layer" not in name:
            p.requires_grad_(True)
    optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=1e-2, **kwargs)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_random_pruning_zeroes_the_generators_mask_on_lora_moments_only(adamw_stepped):
    model, optimizer = fresh(adamw_stepped)
    lora = dict(lora_parameters(model))
    assert len(lora) == 4 * len(TARGETS)  # A and B of 7 targets in 2 layers
    before = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in optimizer.state.items()}
    assert prune_moments(model, optimizer, mode="random", ratio=0.5, generator=torch.Generator().manual_seed(7)) == 2 * len(lora)
    shadow = torch.Generator().manual_seed(7)
    zeroed, total = 0, 0
    for name, param in lora.items():
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            keep = torch.rand(param.shape, generator=shadow) > 0.5
            assert torch.equal(state[key], before[param][key] * keep), (name, key)
            zeroed, total = zeroed + int((~keep).sum()), total + keep.numel()
        assert torch.equal(state["step"], before[param]["step"])  # step counters kept
    assert abs(zeroed / total - 0.5) < 0.02  # ~ 20k draws
    others = [p for p in optimizer.state if all(p is not q for q in lora.values())]
    assert others and all(torch.equal(optimizer.state[p]["exp_avg"], before[p]["exp_avg"]) for p in others)


def test_magnitude_pruning_quantile_rule():
    """Distinct magnitudes 1..100 (shuffled, signed): quantile_0.9 = 90.1 (linear interpolation at 89.1), so
    exactly the entries with |x| <= 90 are zeroed and the ten largest are kept untouched."""
    values = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double() + 1
    values = values * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0).double()
    tensor = values.reshape(10, 10).clone()
    magnitude_prune_(tensor, 0.9)
    kept = tensor[tensor != 0]
    assert sorted(kept.abs().tolist()) == [float(v) for v in range(91, 101)]
    assert torch.equal(tensor, values.reshape(10, 10) * (values.abs() > 90).reshape(10, 10))


def test_magnitude_pruning_on_moments_leaves_the_expected_count(adamw_stepped):
    model, optimizer = fresh(adamw_stepped)
    prune_moments(model, optimizer, mode="magnitude", ratio=0.9, generator=torch.Generator())
    for name, param in lora_parameters(model):
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = optimizer.state[param][key]
            # distinct nonzero magnitudes: ceil(0.1 (numel - 1)) entries lie strictly above the interpolated quantile
            assert int(torch.count_nonzero(tensor)) == math.ceil(0.1 * (tensor.numel() - 1)), (name, key)


# ----------------------------------------------------------------------------- the timetable, state, refusals

def test_timetable_merges_after_k_tm_plus_1_and_prunes_after_k_c_plus_1(adamw_stepped):
    model, optimizer = fresh(adamw_stepped)
    relora = ReLoRA(model, optimizer, relora_every=3, cycle_length=6, mode="random", ratio=RESET_RATIO, seed=0)
    schedule = {u: relora.due(u) for u in range(1, 15)}
    assert [u for u, (merge, _) in schedule.items() if merge] == [4, 7, 10, 13]
    assert [u for u, (_, prune) in schedule.items() if prune] == [7, 13]
    lines = relora.after_update(7)
    assert relora.merges == 1 and relora.prunes == 1 and "merge 1" in lines[0] and "random pruning 1" in lines[1]


def test_generator_is_seeded_apart_and_its_state_restores(adamw_stepped):
    model, optimizer = fresh(adamw_stepped)
    relora = ReLoRA(model, optimizer, relora_every=2, cycle_length=2, mode="random", ratio=0.5, seed=5)
    assert torch.equal(relora.generator.get_state(), torch.Generator().manual_seed(5 + SEED_OFFSET).get_state())
    relora.after_update(3)
    saved = relora.state_dict()
    expected = torch.rand(4, generator=relora.generator)
    other = ReLoRA(model, optimizer, relora_every=2, cycle_length=2, mode="random", ratio=0.5, seed=5)
    other.load_state_dict(saved)
    assert (other.merges, other.prunes) == (1, 1) and torch.equal(torch.rand(4, generator=other.generator), expected)


def test_refuses_an_optimizer_without_adam_moments(tiny_llama, adamw_stepped):
    model, optimizer = stepped(tiny_llama, torch.optim.SGD, momentum=0.9)
    with pytest.raises(ReLoRAError, match=r"SGD's state of .*lora_A.* holds momentum_buffer .*use an Adam-type optimizer"):
        check_optimizer_states(model, optimizer)
    model, optimizer = fresh(adamw_stepped)
    check_optimizer_states(model, optimizer)  # AdamW: accepted


def test_refuses_a_model_without_adapters(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ReLoRAError, match="needs LoRA adapters"):
        ReLoRA(model, torch.optim.AdamW(model.parameters()), relora_every=2, cycle_length=2, mode="random", ratio=0.5, seed=0)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ("random", RESET_RATIO)),
    ({"reset_optimizer_on_relora": True}, ("random", 0.999)),
    ({"optimizer_random_pruning": 0.8}, ("random", 0.8)),
    ({"optimizer_magnitude_pruning": 0.9}, ("magnitude", 0.9)),
])
def test_pruning_mode(kwargs, expected):
    args = {"reset_optimizer_on_relora": False, "optimizer_random_pruning": None, "optimizer_magnitude_pruning": None}
    assert pruning_mode(**{**args, **kwargs}) == expected


def test_pruning_mode_refuses_two_modes_and_bad_ratios():
    with pytest.raises(ReLoRAError, match="give one optimizer pruning mode for --relora, not --reset_optimizer_on_relora "
                                          "and --optimizer_magnitude_pruning"):
        pruning_mode(reset_optimizer_on_relora=True, optimizer_random_pruning=None, optimizer_magnitude_pruning=0.9)
    with pytest.raises(ReLoRAError, match=r"--optimizer_random_pruning must be in \[0, 1\), got 1.0"):
        pruning_mode(reset_optimizer_on_relora=False, optimizer_random_pruning=1.0, optimizer_magnitude_pruning=None)


# ----------------------------------------------------------------------------- through the CLI

def relora_flags(**overrides):
    """9 updates of a tiny LoRA model, T_m = C = 3 (merge and prune after updates 4 and 7), Wr 1, random pruning at
    0.5 (the generator's masks matter), checkpoints every 2 updates: 4 is right after a merge, 6 between two."""
    return {"optimizer": "adamw", "adapter": "lora", "lora_rank": 4, "relora": 3, "cycle_length": 3,
            "restart_warmup_steps": 1, "optimizer_random_pruning": 0.5, "scheduler": "cosine_restarts",
            "num_training_steps": 9, "warmup_steps": 1, "save_every": 2, "eval_every": 9, **overrides}


@pytest.fixture(scope="module")
def relora_run(tmp_path_factory, c4_dir, tokenizer_dir):
    from tests.train.test_cli import tiny_args
    from train import __main__ as cli

    folder = tmp_path_factory.mktemp("relora")
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", **relora_flags())
    assert cli.main(argv) == 0
    return {"folder": folder, "run": folder / "run", "argv": argv}


def test_cli_run_merges_prunes_and_logs_on_the_timetable(relora_run):
    from tests.train.test_cli import read_metrics

    run = relora_run["run"]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 10))
    trainer = {step: torch.load(run / f"step_{step:07d}" / "trainer.pt", weights_only=True) for step in (2, 4, 6, 8, 9)}
    assert [(trainer[s]["relora"]["merges"], trainer[s]["relora"]["prunes"]) for s in (2, 4, 6, 8, 9)] == [
        (0, 0), (1, 1), (1, 1), (2, 2), (2, 2)]
    from safetensors.torch import load_file
    after_merge = load_file(run / "step_0000004" / "model.safetensors")
    b = [v for k, v in after_merge.items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(v) == 0 for v in b)  # re-initialised after update 4, not yet trained


@pytest.mark.parametrize("resume_at", [4, 6], ids=["right-after-a-merge", "between-two-merges"])
def test_cli_resume_across_a_merge_is_bit_identical(relora_run, resume_at):
    from tests.train.test_cli import weights
    from train import __main__ as cli

    resumed = relora_run["folder"] / f"resumed-{resume_at}"
    argv = relora_run["argv"] + ["--continue_from", str(relora_run["run"] / f"step_{resume_at:07d}"),
                                 "--save_dir", str(resumed)]
    assert cli.main(argv) == 0
    expected, got = weights(relora_run["run"] / "step_0000009"), weights(resumed / "step_0000009")
    assert expected.keys() == got.keys() and any("lora_A" in key for key in expected)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    saved = torch.load(relora_run["run"] / "step_0000009" / "trainer.pt", weights_only=True)["relora"]
    again = torch.load(resumed / "step_0000009" / "trainer.pt", weights_only=True)["relora"]
    assert torch.equal(saved["generator"], again["generator"]) and saved["merges"] == again["merges"] == 2


@pytest.mark.parametrize("overrides, message", [
    ({"adapter": None, "lora_rank": None}, "--relora needs --adapter lora"),
    ({"scheduler": "cosine"}, "--relora needs --scheduler cosine_restarts (not cosine)"),
    ({"reset_optimizer_on_relora": True}, "give one optimizer pruning mode for --relora, not --reset_optimizer_on_relora "
                                          "and --optimizer_random_pruning"),
    ({"optimizer_random_pruning": 1.5}, "--optimizer_random_pruning must be in [0, 1), got 1.5"),
    ({"cycle_length": 4}, "--num_training_steps 9 must be divisible by --cycle_length 4"),
    ({"restart_warmup_steps": None}, "--scheduler cosine_restarts needs --restart_warmup_steps"),
    ({"relora": None}, "--optimizer_random_pruning needs --relora"),
    ({"adapter": "low_rank"}, "--relora merges B A into a frozen W0, which --adapter low_rank does not keep"),
    ({"fsdp": True}, "--relora does not combine with --fsdp: the merge and the pruning work on whole tensors"),
    ({"restart_variant": "relora_head", "warmup_steps": 4}, "--warmup_steps 4 + --adjust_step 0 must be <= --cycle_length 3"),
])
def test_cli_refusals_are_one_line_and_create_nothing(overrides, message, tmp_path, c4_dir, tokenizer_dir, capsys):
    from tests.train.test_cli import tiny_args
    from train import __main__ as cli

    run = tmp_path / "run"
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **relora_flags(**overrides))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.parametrize("layerwise", [False, True], ids=["joint", "layerwise"])
def test_cli_refuses_an_optimizer_without_adam_moments_before_anything_exists(layerwise, tmp_path, c4_dir,
                                                                               tokenizer_dir, capsys):
    """SCALE keeps no Adam moments for the factors: the preflight's meta-device step shows it (exit 2, one line)."""
    from tests.train.test_cli import tiny_args
    from train import __main__ as cli

    run = tmp_path / "run"
    flags = relora_flags(optimizer="scale", **({"layerwise": True, "gradient_accumulation": 1} if layerwise else {}))
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --relora prunes Adam's elementwise moments") and "lora_A" in err, err
    assert len(err.splitlines()) == 1 and not run.exists()


def test_dry_run_describes_the_timetable(tmp_path, c4_dir, tokenizer_dir, capsys):
    """N = 9, T_m = C = 3: merges after updates 4 and 7 (two); the schedule line names the restarts."""
    from tests.train.test_cli import tiny_args
    from train import __main__ as cli

    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", **relora_flags(), dry_run=True)) == 0
    out = capsys.readouterr().out
    assert ("relora: merge into W0 and re-init every 3 updates (2 merges, after updates k x 3 + 1); random pruning of "
            "the factors' Adam moments at 0.5 after updates k x 3 + 1") in out, out
    assert "cosine_restarts (restarts every 3 updates, ramps of 1, galore variant)" in out


def test_pruning_reaches_layerwise_states(tiny_llama):
    """--layerwise: one AdamW per parameter stepped inside backward; its merged `state` view holds the same dicts,
    so the pruning zeroes the per-parameter optimizers' moments (the generator's mask, as for the joint one)."""
    from apollo.layerwise import LayerwiseOptimizer

    model = lora_model(tiny_llama)
    optimizer = LayerwiseOptimizer(model, "adamw", lr=1e-2)
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()  # the update runs in the hooks
    check_optimizer_states(model, optimizer)
    before = {p: optimizer.state[p]["exp_avg_sq"].clone() for _, p in lora_parameters(model)}
    assert sum(int(torch.count_nonzero(v)) for v in before.values()) > 1000  # B's moments (A's gradient is 0 at B = 0)
    prune_moments(model, optimizer, mode="random", ratio=0.5, generator=torch.Generator().manual_seed(1))
    shadow = torch.Generator().manual_seed(1)
    inner = {p: s for opt in optimizer.optimizers for p, s in opt.state.items()}
    for _, param in lora_parameters(model):
        torch.rand(param.shape, generator=shadow)  # exp_avg's mask
        keep = torch.rand(param.shape, generator=shadow) > 0.5
        assert torch.equal(inner[param]["exp_avg_sq"], before[param] * keep)


def test_relora_cycles_sets_the_interval_from_the_updates():
    """--relora_cycles K: T_m = C = N / K, resolved (a study sets N per budget); again on the resolved values."""
    from train.config import ConfigError, parse_args, resolve

    base = ["--model_config", "m.json", "--batch_size", "2", "--adapter", "lora", "--lora_rank", "4", "--scheduler",
            "cosine_restarts", "--restart_warmup_steps", "10", "--num_training_steps", "1000", "--warmup_steps", "100",
            "--relora_cycles", "5"]
    config, _ = resolve(parse_args(base))
    assert (config.relora, config.cycle_length) == (200, 200)
    assert resolve(config)[0].relora == 200
    with pytest.raises(ConfigError, match=r"^--relora_cycles 3 must divide --num_training_steps 1000$"):
        resolve(parse_args(base[:-1] + ["3"]))
    with pytest.raises(ConfigError, match=r"^--relora_cycles 5 sets --cycle_length to 200; leave --cycle_length out$"):
        resolve(parse_args(base + ["--cycle_length", "100"]))


def test_study_row_with_relora(tmp_path):
    """A study row: adamw + LoRA + ReLoRA in K cycles; each budget's runs get T_m = C = N / K."""
    from tests.train.test_study import write_spec
    from train import study
    from train.config import parse_args, resolve
    from train.study.spec import load_spec

    spec = load_spec(write_spec(tmp_path, optimizers="""[optimizers.relora]
optimizer = "adamw"
adapter = "lora"
lora_rank = 4
relora_cycles = 2
scheduler = "cosine_restarts"
restart_warmup_steps = 1
lr = [0.001]""", stages='[[stages]]\nname = "tune"\nbudgets = [1280, 2560]'))  # 20 and 40 updates
    planned, _ = study.plan(spec, lambda run: False)
    assert len(planned["tune"]) == 2
    for run in planned["tune"]:
        config, _ = resolve(parse_args(run.flags))
        assert config.relora == config.cycle_length == config.num_training_steps // 2 > config.warmup_steps, run.name


RELORA_RECIPES = [f"llama_{size}_relora" for size in ("60m", "130m", "350m", "1b")]


@pytest.mark.parametrize("stem", [stem if stem.startswith("llama_60m") else pytest.param(stem, marks=pytest.mark.slow)
                                  for stem in RELORA_RECIPES])
def test_recipe_trains_a_few_updates_on_the_tiny_model(stem, tmp_path, c4_dir, tokenizer_dir, monkeypatch):
    """The recipe's own command with the model, batch, steps and cycle overridden trains 4 updates with a merge after
    update 3; its published settings (r of its size, T_m = C = N/5, Wr 100, pruning 0.999) are in the script."""
    import json

    from tests.train.test_cli import read_metrics, write_tiny_config
    from tests.train.test_recipes import SCRIPTS, _launch_command
    from train import __main__ as cli

    env = {"DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "WANDB_MODE": "disabled", "NGPU": "1"}
    command = _launch_command(SCRIPTS / f"{stem}.sh", env)
    flag = lambda name: command[command.index(name) + 1]
    size = stem.split("_")[1]
    assert flag("--lora_rank") == str({"60m": 128, "130m": 256, "350m": 256, "1b": 512}[size])
    steps = int(flag("--num_training_steps"))
    assert int(flag("--relora")) == int(flag("--cycle_length")) == steps // 5 > int(flag("--warmup_steps"))
    assert (flag("--restart_warmup_steps"), flag("--scheduler")) == ("100", "cosine_restarts")
    assert "--reset_optimizer_on_relora" in command
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    overrides = ["--model_config", str(write_tiny_config(tmp_path)), "--lora_rank", "4", "--batch_size", "2",
                 "--gradient_accumulation", "1", "--total_batch_size", "2", "--max_length", "32",
                 "--num_training_steps", "4", "--warmup_steps", "1", "--relora", "2", "--cycle_length", "2",
                 "--restart_warmup_steps", "1", "--eval_every", "4", "--save_every", "4", "--eval_tokens", "200",
                 "--workers", "0", "--dtype", "float32", "--save_dir", str(tmp_path / "run")]
    assert cli.main(command[6:] + overrides) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["optimizer"], config["adapter"], config["lora_alpha"], config["lora_dropout"]) == ("adamw", "lora", 32.0, 0.05)
    assert (config["eps"], config["lr"], config["reset_optimizer_on_relora"]) == (1e-8, 0.001, True)
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 4
    relora = torch.load(tmp_path / "run" / "step_0000004" / "trainer.pt", weights_only=True)["relora"]
    assert (relora["merges"], relora["prunes"]) == (1, 1)  # after update 3
