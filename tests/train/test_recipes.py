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

import apollo
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


def _script_flags(script: Path) -> dict:
    """The flags of a recipe's `launch` line: flag name -> its value as written (True for a bare switch)."""
    words = shlex.split(script.read_text().split("launch ", 1)[1].replace("\\\n", " "))
    return {word[2:]: True if i + 1 == len(words) or words[i + 1].startswith("--") or words[i + 1] == "$@"
            else words[i + 1] for i, word in enumerate(words) if word.startswith("--")}


def _same(written, declared) -> bool:
    if declared is True:
        return written is True
    try:
        return float(written) == float(declared)
    except (TypeError, ValueError):
        return written == declared


def test_every_specs_recipe_is_a_script_that_carries_its_settings():
    """OptimizerSpec.recipes (the published settings, PROTOCOL.md / PEERS.md) against scripts/benchmark_c4: each
    declared size has its llama_<size>_<name or alias>.sh, launching that optimizer with every declared value."""
    checked = 0
    for name in apollo.optimizer_names():
        spec = apollo.get_spec(name)
        for size, settings in spec.recipes.items():
            scripts = [SCRIPTS / f"llama_{size}_{n}.sh" for n in (name, *spec.aliases)]
            script = next((path for path in scripts if path.exists()), None)
            assert script is not None, f"{name} declares a {size} recipe; none of {[p.name for p in scripts]} exists"
            flags = _script_flags(script)
            assert flags["optimizer"] in (name, *spec.aliases), script.name
            for flag, value in settings.items():
                assert flag in flags and _same(flags[flag], value), (script.name, flag, flags.get(flag), value)
                checked += 1
    assert checked >= 150


def test_every_optimizer_recipe_script_is_declared_by_its_spec():
    """A llama_<size>_<optimizer>.sh of a registered name or alias is one of that spec's recipes, so its settings
    are checked above (variants such as llama_7b_apollo_fsdp.sh or llama_350m_q_apollo.sh are not)."""
    names = {alias: name for name in apollo.optimizer_names() for alias in (name, *apollo.get_spec(name).aliases)}
    plain = [(p, p.stem.split("_", 2)) for p in RECIPES if p.stem.split("_", 2)[2] in names]
    assert len(plain) >= 40
    for script, (_, size, optimizer) in plain:
        assert size in apollo.get_spec(names[optimizer]).recipes, f"{script.name}: not in {names[optimizer]}'s recipes"


def test_the_launch_variants_exist():
    names = {p.stem for p in RECIPES}
    assert {"llama_13b_apollo_mini_launch", "llama_350m_long_context_adamw", "llama_350m_long_context_apollo",
            "llama_350m_long_context_apollo_mini"} <= names


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
