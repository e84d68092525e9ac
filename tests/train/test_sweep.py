"""train.sweep: grid parsing, naming, and a real 2 x 2 sweep of a tiny model on the local C4 sample
that finishes, is skipped when run again, resumes a run cut short, and compares 4 runs."""
import shutil
import sys

import pytest
from PIL import Image

from tests.train.test_cli import tiny_args
from train import sweep
from train.checkpoint import checkpoint_path


def test_parse_grid_splits_axes_from_fixed_flags():
    fixed, axes = sweep.parse_grid(["--lr", "1e-3,5e-3", "--packing", "--rank", "128,256", "--seed", "1"])
    assert fixed == ["--packing", "--seed", "1"]
    assert axes == {"lr": ["1e-3", "5e-3"], "rank": ["128", "256"]}


@pytest.mark.parametrize("tokens,message", [
    (["--lr", "1e-3,"], "--lr '1e-3,': a grid axis needs at least two comma-separated values"),
    (["--save_dir", "x"], "--save_dir is set by the sweep for each run; leave it out"),
    (["--name", "a,b"], "--name is set by the sweep for each run; leave it out"),
    (["lr", "1"], "expected a --flag, got 'lr'"),
])
def test_bad_grids(tokens, message):
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweep.parse_grid(tokens)


def test_cli_errors(tmp_path, capsys):
    assert sweep.main(["missing.sh", "--sweep_dir", str(tmp_path), "--lr", "1,2"]) == 2
    assert capsys.readouterr().err.strip() == "sweep: recipe missing.sh: no such file (a scripts/benchmark_c4/*.sh recipe, or 'train')"
    assert sweep.main(["train", "--sweep_dir", str(tmp_path), "--lr", "1"]) == 2
    assert "no grid axis" in capsys.readouterr().err


def test_plan_names_runs_from_their_values(tmp_path):
    runs = sweep.plan("scripts/benchmark_c4/llama_60m_apollo.sh", tmp_path, {"apollo_scale": ["1", "2"], "rank": ["128"]})
    assert [r.name for r in runs] == ["llama_60m_apollo-apollo_scale1-rank128", "llama_60m_apollo-apollo_scale2-rank128"]
    assert runs[1].flags == ["--apollo_scale", "2", "--rank", "128"]


def test_two_by_two_sweep_finishes_skips_resumes_and_compares(tmp_path, c4_dir, tokenizer_dir, capsys):
    base = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "unused", optimizer="apollo", num_training_steps=4,
                     save_every=2, eval_every=2)
    at = base.index("--save_dir")  # the sweep sets --save_dir and --name per run
    base = base[:at] + base[at + 2:]
    grid = ["--lr", "0.01,0.003", "--rank", "2,4"]
    sweep_dir = tmp_path / "sweep"

    assert sweep.sweep("train", base + grid, sweep_dir) == 0
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert names == ["train-lr0.003-rank2", "train-lr0.003-rank4", "train-lr0.01-rank2", "train-lr0.01-rank4"]
    table = (sweep_dir / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 4
    assert {row.split(" | ")[2] for row in table[2:]} == {"2", "4"}  # the rank column
    with Image.open(sweep_dir / "perplexity.png") as image:
        image.verify()

    # run again: everything is finished already
    capsys.readouterr()
    assert sweep.sweep("train", base + grid, sweep_dir) == 0
    assert capsys.readouterr().err.count("finished already, skipped") == 4

    # cut one run short (drop its final checkpoint): it is resumed from step 2 and finishes
    cut = sweep_dir / "train-lr0.01-rank4"
    shutil.rmtree(checkpoint_path(cut, 4))
    assert sweep.run_status(cut) == "partial"
    printed = capsys.readouterr()
    sweep.sweep("train", base + grid, sweep_dir, print_only=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("# done: ") for line in lines) == 3
    resumed = next(line for line in lines if not line.startswith("#"))
    assert resumed.startswith(f"{sys.executable} -m train") and resumed.endswith(f"--continue_from {cut}")
    assert sweep.sweep("train", base + grid, sweep_dir) == 0
    assert sweep.run_status(cut) == "done"
    assert "resuming" in capsys.readouterr().err
