"""scripts/study_cpu.sh keeps working: a 2-optimizer, 2-step version writes the study document and PNG."""
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 1-2 minutes; the study tool that supersedes this script has its real test in tests/train/test_study.py
def test_study_script_small_version(tmp_path, c4_dir, tokenizer_dir):
    env = {**os.environ, "DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "OUT": str(tmp_path / "out"),
           "DOC": str(tmp_path / "doc" / "study.md"), "OPTIMIZERS": "adamw apollo_mini", "STEPS": "2", "BATCH": "2",
           "MAX_LENGTH": "32", "EVAL_EVERY": "2", "EVAL_TOKENS": "200", "WARMUP": "1", "WANDB_MODE": "disabled",
           "ADAMW_LRS": "1e-3,2e-3", "MINI_LRS": "1e-3,2e-3", "CHECKS": "lr=5e-4,eps=1e-6"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "study_cpu.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = (tmp_path / "doc" / "study.md").read_text()
    best, everything = doc.split("## Checks")[0].split("All runs:")
    # both sweeps name their runs train-lr1e-3, train-lr2e-3: the tables tell them apart by optimizer
    assert best.count(" train-lr") == 2 and "| adamw train-lr" in best and "| apollo_mini train-lr" in best
    assert everything.count(" train-lr") == 4
    assert "Budget per run: 2 updates x 2 sequences x 32 positions = 128 tokens" in doc
    checks = doc.split("## Checks")[1]
    assert "| adamw-lr5e-4-eps1e-6 |" in checks and checks.count("| train-lr") == 2  # beside the grid's AdamW
    with Image.open(tmp_path / "doc" / "study.png") as image:
        image.verify()
