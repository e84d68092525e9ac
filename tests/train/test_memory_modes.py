"""The memory-saving modes through `python -m train`: int8 weights (--weight_quant) and layer-wise updates (--layerwise).

A scaled-down single-GPU Q-APOLLO-Mini recipe trains on the local C4 sample and resumes bit for bit; the bad
flag combinations fail before training with one line; the 7B single-GPU recipe's dry run fits in 12 GB.
"""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train.test_cli import read_metrics, run_train, tiny_args, weights
from train import __main__ as cli

REPO_ROOT = Path(__file__).resolve().parents[2]
SINGLE_GPU_RECIPE = REPO_ROOT / "scripts" / "single_gpu" / "llama_7b_q_apollo_mini_layerwise.sh"

# The single-GPU recipe's flags on the tiny model (hidden 32, inter 64: groups of 32 divide every linear weight).
RECIPE_FLAGS = {"optimizer": "apollo_mini", "weight_quant": True, "weight_group_size": 32, "stochastic_round": True,
                "layerwise": True, "single_gpu": True, "batch_size": 2, "gradient_accumulation": None,
                "total_batch_size": 2, "num_training_steps": 4, "save_every": 2, "eval_every": 100}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, c4_dir, tokenizer_dir):
    """4 updates of the scaled-down recipe (checkpoints at 2 and 4), in this process to save start-up time."""
    folder = tmp_path_factory.mktemp("q_layerwise")
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", **RECIPE_FLAGS)
    assert cli.main(argv) == 0
    return {"folder": folder, "run": folder / "run", "argv": argv}


def test_layerwise_int8_recipe_trains_and_saves_uint8_weights(recipe_run):
    run = recipe_run["run"]
    train = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)  # measured in the hooks
    assert train[0]["lr"] == 0.0 and train[1]["lr"] == pytest.approx(0.01)  # the schedule reaches every group
    assert train[0]["optimizer_state_bytes"] > 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000002", "step_0000004"]

    saved = weights(run / "step_0000004")
    linears = [key for key in saved if key.endswith("_proj.weight")]
    assert len(linears) == 2 * 7 and all(saved[key].dtype == torch.uint8 for key in linears)
    for key in linears:
        layer = key[: -len(".weight")]
        assert saved[f"{layer}.weight_scales"].dtype == torch.float32
        assert saved[f"{layer}.weight_zeros"].dtype == torch.uint8
        assert saved[f"{layer}.rounding_state"].tolist()[1] == 4  # one stochastic re-quantisation per update
    assert saved["model.embed_tokens.weight"].dtype == torch.float32
    before = weights(run / "step_0000002")
    assert any(not torch.equal(before[key], saved[key]) for key in linears), "int8 weights never changed"


def test_layerwise_int8_resume_is_bit_exact(recipe_run):
    """Resume at update 2: weights, scales, zeros and rounding states after update 4 equal the uninterrupted run's."""
    original, resumed = recipe_run["run"], recipe_run["folder"] / "resumed"
    argv = recipe_run["argv"] + ["--continue_from", str(original / "step_0000002"), "--save_dir", str(resumed)]
    assert cli.main(argv) == 0
    expected, got = weights(original / "step_0000004"), weights(resumed / "step_0000004")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    losses = lambda run: [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run) if "loss" in r and r["step"] > 2]
    assert losses(resumed) == losses(original)
    expected_state = torch.load(original / "step_0000004" / "optimizer.pt", weights_only=True)
    got_state = torch.load(resumed / "step_0000004" / "optimizer.pt", weights_only=True)
    assert expected_state["names"] == got_state["names"]
    for saved, loaded in zip(expected_state["optimizers"], got_state["optimizers"]):
        for index, state in saved["state"].items():
            for name, value in state.items():
                other = loaded["state"][index][name]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_int8_weights_with_accumulation_and_clipping(tmp_path, c4_dir, tokenizer_dir):
    """--weight_quant without --layerwise: the joint optimizer, 2 micro-batches, the clip over float_grad too."""
    run = tmp_path / "run"
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, optimizer="apollo", rank=4, weight_quant=True,
                     weight_group_size=32, grad_clipping=1.0, num_training_steps=2, save_every=2, eval_every=100)
    assert cli.main(argv) == 0
    train = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["grad_norm"] > 0 for r in train)
    saved = weights(run / "step_0000002")
    assert saved["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert saved["model.layers.0.mlp.up_proj.rounding_state"].tolist()[1] == 0  # round to nearest: no draws


BAD_FLAGS = [  # (flags, env, the start of the one-line error)
    ({"layerwise": True}, {}, "error: --layerwise updates every weight during backward, so gradients cannot be accumulated"),
    ({"layerwise": True, "gradient_accumulation": 1, "grad_clipping": 1.0}, {},
     "error: --layerwise cannot clip the global gradient norm"),
    ({"layerwise": True, "gradient_accumulation": 1, "nan_policy": "skip"}, {},
     "error: --layerwise applies each update during backward, so a NaN loss cannot be skipped"),
    ({"layerwise": True, "gradient_accumulation": 1, "total_batch_size": 4}, {"WORLD_SIZE": "2", "RANK": "0"},
     "error: --layerwise runs on one process"),
    ({"weight_quant": True, "weight_bits": 4, "optimizer": "apollo"}, {}, "error: --weight_bits must be 8"),
    ({"weight_quant": True, "weight_group_size": 0, "optimizer": "apollo"}, {},
     "error: --weight_group_size must be a positive integer, got 0"),
    ({"weight_quant": True, "optimizer": "adamw"}, {}, "error: --weight_quant does not work with --optimizer adamw: torch.optim.AdamW cannot update int8 weights"),
    ({"weight_quant": True, "weight_group_size": 48, "optimizer": "apollo"}, {},
     "error: --weight_group_size 48: model.layers.0.self_attn.q_proj.weight (32, 32) has 1024 elements, not divisible"),
]


@pytest.mark.parametrize("flags, env, message", BAD_FLAGS, ids=[m[7:40] for _, _, m in BAD_FLAGS])
def test_bad_memory_mode_flags_exit_2_with_one_line(flags, env, message, tmp_path, c4_dir, tokenizer_dir, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", **flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert not (tmp_path / "run").exists()


def test_quantisation_flags_without_weight_quant_warn(tmp_path, c4_dir, tokenizer_dir, capsys):
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", optimizer="apollo", stochastic_round=True,
                     weight_group_size=32, dry_run=True)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "warning: --weight_group_size is ignored without --weight_quant" in captured.err
    assert "warning: --stochastic_round is ignored without --weight_quant" in captured.err
    assert "memory modes: none" in captured.out


def test_dry_run_passes_the_modes_to_the_memory_estimate(tmp_path, c4_dir, tokenizer_dir, monkeypatch, capsys):
    import train.plan

    seen = {}
    real_estimate = train.plan.estimate

    def estimate(*args, **kwargs):
        seen.update(kwargs)
        return real_estimate(*args, **kwargs)

    monkeypatch.setattr(train.plan, "estimate", estimate)
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", optimizer="apollo", gradient_accumulation=1,
                     weight_quant=True, weight_group_size=32, stochastic_round=True, layerwise=True, dry_run=True)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "memory modes: int8 attention/MLP weights in groups of 32 (stochastic rounding); layer-wise updates" in out
    assert {key: seen[key] for key in ("weight_quant", "weight_group_size", "weight_bits", "stochastic_round", "layerwise")} \
        == {"weight_quant": True, "weight_group_size": 32, "weight_bits": 8, "stochastic_round": True, "layerwise": True}


def test_single_gpu_7b_recipe_dry_run_fits_12_gb(c4_dir, tokenizer_dir, monkeypatch, capsys):
    """The recipe's exact command (PRINT_COMMAND=1), run in this process with --dry_run."""
    env = {**os.environ, "DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "WANDB_MODE": "disabled",
           "PRINT_COMMAND": "1"}
    command = shlex.split(subprocess.run(["bash", str(SINGLE_GPU_RECIPE)], env=env, capture_output=True, text=True,
                                         check=True).stdout)
    assert command[:3] == ["python", "-m", "train"]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(command[3:] + ["--dry_run"]) == 0
    captured = capsys.readouterr()
    # (t5-base's 32100 ids against LLaMA's 32000 rows is a data warning of its own, not a memory-mode one)
    warnings = [line for line in captured.err.splitlines() if "warning" in line and "read as <unk>" not in line]
    assert not warnings, captured.err
    assert "int8 attention/MLP weights in groups of 128 (stochastic rounding); layer-wise updates" in captured.out
    line = next(line for line in captured.out.splitlines() if line.startswith("memory per process"))
    total = float(re.search(r"= ([0-9.]+) GB \(peak: [a-z_ ]+\)", line).group(1))
    terms = [float(value) for value in re.findall(r" (\d+\.\d+)(?= \+| =)", line)]
    assert total < 12 and abs(sum(terms) - total) <= 0.005 * len(terms), line


@pytest.mark.slow
def test_int8_weights_stay_identical_across_ddp_replicas(tmp_path, c4_dir, tokenizer_dir):
    """Two processes: DDP does not average int8 weights' float_grad; the loop's all-reduce keeps the replicas equal."""
    run = tmp_path / "run"
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, optimizer="apollo", rank=4, weight_quant=True,
                     weight_group_size=32, stochastic_round=True, total_batch_size=8, num_training_steps=2,
                     save_every=2, eval_every=100)
    run_train(argv, nproc=2)
    final = read_metrics(run)[-1]
    assert final["replicas_identical"] is True and final["param_checksums"][0] == final["param_checksums"][1]
    assert weights(run / "step_0000002")["model.layers.1.self_attn.o_proj.weight"].dtype == torch.uint8


def test_resume_refuses_a_different_weight_layout(recipe_run, capsys):
    argv = recipe_run["argv"] + ["--continue_from", str(recipe_run["run"] / "step_0000002"),
                                 "--save_dir", str(recipe_run["folder"] / "other")]
    argv.remove("--layerwise")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was saved with other settings that change the training: --layerwise True -> False " \
                                     "(checkpoint -> command line)" in err, err


def test_dry_run_prints_each_optimizers_own_routing(tmp_path, c4_dir, tokenizer_dir, capsys):
    """--dry_run's optimizer line lists the groups the optimizer's routing made (issue 25: it printed APOLLO's
    low-rank/regular split for every optimizer)."""
    import apollo
    from train.config import resolve
    from train.plan import describe
    from tests.train.test_cli import write_tiny_config
    from train import __main__ as cli

    expected = {}
    for name in apollo.optimizer_names():
        config, _ = resolve(cli.parse_args(["--model_config", str(write_tiny_config(tmp_path)), "--optimizer", name,
                                            "--lr", "0.01", "--batch_size", "2", "--total_batch_size", "2",
                                            "--max_length", "32", "--num_training_steps", "2", "--warmup_steps", "0",
                                            "--data_dir", str(c4_dir), "--tokenizer", str(tokenizer_dir),
                                            "--save_dir", str(tmp_path / name), "--wandb", "disabled"]), 1)
        expected[name] = next(line for line in describe(config, 1) if line.startswith("optimizer: "))
    assert set(expected) == set(apollo.optimizer_names())
    assert "low-rank" not in next(iter(expected.values()))
    assert "low_rank: 14 tensors (0.02M values)" in expected["apollo"]  # 2 x (4 x 32 x 32 + 3 x 32 x 64)
    assert "low_rank" not in expected["scale"] and "low_rank" not in expected["adam_mini"]
    assert len(set(line.split(";", 1)[1] for line in expected.values())) >= 5  # the routings really differ


def test_dry_run_under_hsdp_shards_over_the_shard_group_only(tmp_path, c4_dir, tokenizer_dir):
    """--fsdp --replicate_degree 2 on 4 processes: each rank holds 1/2 of the weights (2 shards), not 1/4."""
    import re
    from train.config import resolve
    from train.plan import describe
    from tests.train.test_cli import write_tiny_config
    from train import __main__ as cli

    def weights_gb(*extra):
        config, _ = resolve(cli.parse_args(["--model_config", str(write_tiny_config(tmp_path)), "--lr", "0.01",
                                            "--batch_size", "1", "--total_batch_size", "4", "--max_length", "32",
                                            "--num_training_steps", "2", "--warmup_steps", "0", "--fsdp",
                                            "--data_dir", str(c4_dir), "--tokenizer", str(tokenizer_dir),
                                            "--save_dir", str(tmp_path / "run"), "--wandb", "disabled", *extra]), 4)
        line = describe(config, 4)[-1]
        return line, float(re.search(r"weights ([0-9.]+)", line).group(1))
    fsdp_line, fsdp = weights_gb()
    hsdp_line, hsdp = weights_gb("--replicate_degree", "2")
    assert "FSDP2 shards over 4 processes" in fsdp_line and "HSDP: 2 replicas x 2 shards" in hsdp_line
    assert hsdp == pytest.approx(2 * fsdp, rel=0.05), (fsdp_line, hsdp_line)
