"""Every recipe in scripts/benchmark_c4 validates in dry-run mode: flags parse, batch arithmetic multiplies out
to the published total of 512 for the published GPU count and for others, the model builds on the meta device.

The default test takes each script's exact launch command (PRINT_COMMAND=1) and runs its dry run in this
process (one import of transformers for all of them); the slow test runs every script end to end in bash.
"""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from train.__main__ import main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_c4"
RECIPES = sorted(p for p in SCRIPTS.glob("*.sh") if p.name not in ("common.sh", "cpu_smoke.sh"))


def _launch_command(script: Path, env: dict, *extra: str) -> list[str]:
    out = subprocess.run(["bash", str(script), *extra], env={**os.environ, **env, "PRINT_COMMAND": "1"},
                         capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


@pytest.fixture
def local_env(c4_dir, tokenizer_dir):
    return {"DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "WANDB_MODE": "disabled"}


def test_every_published_row_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for size in ("60m", "130m", "350m", "1b", "7b"):
        for optimizer in ("apollo", "apollo_mini", "galore", "adamw"):
            assert f"llama_{size}_{optimizer}" in names
    assert {"llama_13b_apollo_mini_launch", "llama_350m_long_context_adamw", "llama_350m_long_context_apollo",
            "llama_350m_long_context_apollo_mini"} <= names


def test_every_peer_has_its_recipes():
    names = {p.stem for p in RECIPES}
    expected = ({f"llama_{size}_scale" for size in ("60m", "130m", "350m", "1b", "7b")}
                | {f"llama_{size}_{optimizer}" for size in ("60m", "130m", "350m", "1b")
                   for optimizer in ("fira", "muon", "adam_mini")}
                | {"llama_7b_adamw8bit"})
    assert expected <= names, sorted(expected - names)


def test_peer_recipes_carry_the_published_settings():
    """SCALE's 60M runs 11,000 steps; its lr and adam_lr change at 1B; Fira's alpha drops at 1B (PEERS.md)."""
    def flags(stem):
        words = shlex.split((SCRIPTS / f"{stem}.sh").read_text().split("launch ", 1)[1].replace("\\\n", " "))
        return {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    assert flags("llama_60m_scale")["--num_training_steps"] == "11000"
    assert (flags("llama_350m_scale")["--lr"], flags("llama_350m_scale")["--adam_lr"]) == ("0.001", "0.02")
    assert (flags("llama_1b_scale")["--lr"], flags("llama_1b_scale")["--adam_lr"]) == ("0.0002", "0.001")
    assert (flags("llama_7b_scale")["--lr"], flags("llama_7b_scale")["--adam_lr"]) == ("0.0001", "0.001")
    assert [flags(f"llama_{s}_fira")["--fira_alpha"] for s in ("60m", "350m", "1b")] == ["0.25", "0.25", "0.0625"]
    assert [flags(f"llama_{s}_fira")["--rank"] for s in ("60m", "130m", "350m", "1b")] == ["128", "256", "256", "512"]


@pytest.mark.parametrize("script", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_run(script, local_env, monkeypatch, capsys):
    command = _launch_command(script, local_env)
    assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", command[3]] and command[4:6] == ["-m", "train"]
    world_size = int(command[3])
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    assert main(command[6:] + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"x {world_size} process" in out and "= 512 sequences x" in out, out


def test_accumulation_is_derived_for_any_gpu_count(local_env):
    def batch(ngpu):
        args = _launch_command(SCRIPTS / "llama_130m_apollo.sh", {**local_env, "NGPU": str(ngpu)})
        return int(args[args.index("--batch_size") + 1]), int(args[args.index("--gradient_accumulation") + 1])

    assert batch(4) == (128, 1)   # the published setup
    assert batch(1) == (128, 4)
    assert batch(8) == (64, 1)    # the micro-batch shrinks: 8 x 128 would exceed 512


def test_bad_gpu_count_is_one_clear_line(local_env):
    result = subprocess.run(["bash", str(SCRIPTS / "llama_60m_apollo.sh"), "--dry_run"],
                            env={**os.environ, **local_env, "NGPU": "3"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: TOTAL_BATCH 512 is not divisible by NGPU 3"


def test_extra_arguments_are_forwarded(local_env):
    args = _launch_command(SCRIPTS / "llama_60m_apollo.sh", local_env, "--num_training_steps", "10")
    assert args[-2:] == ["--num_training_steps", "10"]


@pytest.mark.slow
@pytest.mark.parametrize("script", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_run_through_bash(script, local_env):
    result = subprocess.run(["bash", str(script), "--dry_run"], env={**os.environ, **local_env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "= 512 sequences x" in result.stdout
