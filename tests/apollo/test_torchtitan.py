"""apollo inside torchtitan 0.3.0, in an environment of its own (slow: builds it the first time, minutes).

torchtitan 0.3.0 pins datasets<4.8 (and an older huggingface_hub than transformers 5.x needs), so it
cannot share the harness's environment: this test makes a venv with torch (this interpreter's version),
torchtitan 0.3.0 and triton (its models import it), installs this checkout's ``apollo`` there with
``--no-deps`` (it needs torch only), and runs tests/apollo/torchtitan_check.py in it. The venv is kept
at $APOLLO_TORCHTITAN_VENV (default ~/.cache/apollo-harness/torchtitan-0.3.0) and reused.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("APOLLO_TORCHTITAN_VENV", Path.home() / ".cache/apollo-harness/torchtitan-0.3.0"))


def _pip(python: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *args], check=True)


def titan_python() -> Path:
    python = VENV / "bin" / "python"
    probe = "import torchtitan, importlib.metadata as m; assert m.version('torchtitan') == '0.3.0'"
    if not python.exists() or subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(VENV)], check=True)
        _pip(python, f"torch=={torch.__version__}", "torchtitan==0.3.0", "triton")
    # this checkout's apollo, as a user would add it to a torchtitan environment
    _pip(python, "--no-deps", "--force-reinstall", str(REPO))
    return python


@pytest.mark.slow
def test_apollo_through_torchtitan_container_and_dcp(tmp_path):
    python = titan_python()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's installed apollo, not this tree
    done = subprocess.run([str(python), str(REPO / "tests/apollo/torchtitan_check.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["apollo_file"].startswith(str(VENV))
    assert report["params"] == 6163712  # torchtitan's Llama-3 debug model: 256 dim, 6 layers, vocab 2048
    for job, rank in (("apollo_llama3_debugmodel", 64), ("apollo_mini_llama3_debugmodel", 1)):
        assert report["jobs"][job] == {"container": "ApolloOptimizersContainer", "steps": 3, "optimizers": ["APOLLO"],
                                       "ranks": [None, rank]}
    for name in ("apollo", "apollo_mini"):
        result = report[name]
        assert result["same_groups"] and result["low_rank_tensors"] == 30  # 6 layers x (wqkv, wo, w1, w2, w3)
        assert result["equal_max_abs"] == 0.0  # container steps == build_optimizer steps, to the bit
        assert not result["init_moved"]  # torchtitan's lr=0 init step leaves the weights alone
        assert result["resume_max_abs"] == 0.0  # DCP round trip, then 3 steps: weights and state bit-identical
        assert result["flat_keys"] > 0
