"""benchmarks/gpu_check.py --tiny runs every section of the device check at toy sizes on this machine."""
import json
import sys
from pathlib import Path

import pytest

import apollo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


def test_tiny_mode_writes_every_section(tmp_path, monkeypatch, c4_dir, tokenizer_dir, capsys):
    monkeypatch.setenv("DATA_DIR", str(c4_dir))
    monkeypatch.setenv("TOKENIZER", str(tokenizer_dir))
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    names = gpu_check.available_optimizers()
    assert [row["optimizer"] for row in results["correctness"]] == names
    for row in results["correctness"]:
        # the same CPU float32 run twice: identical; bf16 within bf16 rounding of the update
        assert row["device vs cpu fp32 (float32)"] == 0.0, row
        if "fused vs plain (float32)" in row:
            assert row["fused vs plain (float32)"] < 1e-4, row
    assert results["cli_resume"]["result"] == "bit-identical"
    assert {row["optimizer"] for row in results["throughput"]} == set(names)
    assert all(row["tokens_per_s"] > 0 and row["estimate_gb"] > 0 for row in results["throughput"])
    assert [(row["model"], row["mode"]) for row in results["compile_throughput"]] == [("toy", "eager"), ("toy", "compiled")]
    eager, compiled = results["compile_throughput"]
    assert compiled["graphs_after_first"] == 0 and compiled["vs_eager"] == compiled["tokens_per_s"] / eager["tokens_per_s"]
    steps = {row["optimizer"]: row for row in results["optimizer_step"]}
    assert {"apollo [compiled]", "apollo_mini [compiled]", "galore [compiled]"} <= set(steps)  # Table 7's rows
    assert steps[apollo.BASELINE]["vs_adamw"] == 1.0 and steps["apollo"]["refresh_ms"] > 0
    assert f"{apollo.BASELINE} [compiled]" not in steps and steps[apollo.BASELINE]["refresh_ms"] is None
    assert results["single_gpu"]["estimate_gb"] > 0
    assert all(row["largest_micro_batch"] == 4 and row["capped"] for row in results["micro_batch"])
    text = out.read_text()
    for heading in ("## Environment", "## Correctness", "## Training throughput", "## Optimizer step", "## Memory"):
        assert heading in text


def test_full_mode_refuses_a_cpu(capsys):
    assert gpu_check.main(["--device", "cpu", "--skip_pytest"]) == 2
    assert "full mode needs a CUDA device" in capsys.readouterr().err
