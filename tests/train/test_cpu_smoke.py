"""scripts/benchmark_c4/cpu_smoke.sh on a fresh clone without ../shared: it falls back to the hub and says so
in one line; offline, the trainer's error names the hub and the script says how to use local files."""
import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_without_the_local_sample_it_streams_from_the_hub_and_offline_says_what_to_set(tmp_path):
    clone = tmp_path / "clone"  # a checkout with no ../shared beside it
    (clone / "scripts" / "benchmark_c4").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "benchmark_c4" / "cpu_smoke.sh", clone / "scripts" / "benchmark_c4")
    shutil.copytree(REPO_ROOT / "configs", clone / "configs")
    env = {key: value for key, value in os.environ.items() if key not in ("DATA_DIR", "TOKENIZER")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(["bash", "scripts/benchmark_c4/cpu_smoke.sh", "--dry_run"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[0] == ("cpu_smoke: no local sample in ../shared/data: streaming C4 (allenai/c4) and the t5-base "
                        "tokenizer from the Hugging Face hub")
    assert any("HF_DATASETS_OFFLINE is set" in line or "huggingface.co" in line for line in lines), lines
    assert lines[-1].startswith("cpu_smoke: without the hub, point DATA_DIR at a folder of c4-train.*.json.gz")
    assert not (clone / "runs").exists()  # refused before anything was created
