"""train.compare on hand-written run folders: table values, PNG, bad directories reported but not fatal."""
import json

import pytest
from PIL import Image

from train import compare


def _write_run(directory, config, records):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def _records(perplexities, tokens_per_step=1000, throughput=(500.0, 700.0, 600.0), state_bytes=3 * 2**20):
    records = []
    for step in range(1, len(perplexities) + 1):
        train = {"step": step, "loss": 5.0 - step * 0.1, "lr": 0.01, "tokens_seen": step * tokens_per_step,
                 "throughput_tokens": throughput[(step - 1) % len(throughput)], "grad_norm": 1.0}
        if step == 1:
            train["optimizer_state_bytes"] = state_bytes
        records.append(train)
        records.append({"step": step, "eval/loss": 3.0, "eval/perplexity": perplexities[step - 1], "eval/tokens": 100})
    return records


@pytest.fixture
def runs(tmp_path):
    a = _write_run(tmp_path / "a", {"name": "mini-lr1e-2", "optimizer": "apollo_mini", "lr": 0.01, "rank": None},
                   _records([40.0, 30.0, 32.0]))
    b = _write_run(tmp_path / "b", {"name": "adamw", "optimizer": "adamw", "lr": 0.001},
                   _records([50.0, 45.0, 44.0], state_bytes=12 * 2**20))
    no_eval = _write_run(tmp_path / "c", {"name": "fresh", "optimizer": "galore", "lr": 0.01, "rank": 4,
                                          "galore_scale": 0.5},
                         [{"step": 1, "loss": 4.0, "tokens_seen": 10, "throughput_tokens": 5.0}])
    empty = tmp_path / "empty"
    empty.mkdir()
    return a, b, no_eval, empty


def test_table_values_and_png(runs, tmp_path, capsys):
    a, b, no_eval, empty = runs
    out = tmp_path / "out"
    loaded = compare.compare([str(a), str(b), str(no_eval), str(empty)], out, title="t")
    assert [r.name for r in loaded] == ["mini-lr1e-2", "adamw", "fresh"]
    err = capsys.readouterr().err
    assert f"skipped {empty}: no metrics.jsonl" in err
    assert "no evaluation points yet" in err

    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 3
    # sorted by best perplexity; Mini preset rank 1 and scale 128 filled in; median throughput 600
    assert table[2] == "| mini-lr1e-2 | apollo_mini | 1 | 128.0 | 0.01 | 32.00 | 30.00 | 3,000 | 3.00 | 600 |"
    assert table[3] == "| adamw | adamw | - | - | 0.001 | 44.00 | 44.00 | 3,000 | 12.00 | 600 |"
    assert table[4] == "| fresh | galore | 4 | 0.5 | 0.01 | n/a | n/a | 10 | n/a | 5 |"

    with Image.open(out / "perplexity.png") as image:
        assert image.size == (1440, 540)


def test_eval_points_are_placed_at_tokens_seen(runs):
    run = compare.load_run(runs[0])
    assert run.evals == [(1000, 40.0), (2000, 30.0), (3000, 32.0)]


def test_wandb_folder_inside_a_run_resolves_to_the_run(runs):
    wandb_dir = runs[0] / "wandb" / "offline-run-20260101_000000-abc"
    wandb_dir.mkdir(parents=True)
    assert compare.load_run(wandb_dir).name == "mini-lr1e-2"


def test_smoothing_is_a_debiased_ema():
    assert compare.smooth([1.0, 3.0], 0.5) == [1.0, pytest.approx((0.25 + 1.5) / 0.75)]


def test_cli_errors(tmp_path, capsys):
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "compare: none of the given directories holds a run to compare"
    assert compare.main([str(tmp_path), "--smoothing", "1.5"]) == 2


def test_a_resumed_run_keeps_its_final_timeline(tmp_path):
    records = _records([40.0, 30.0, 32.0])  # steps 1..3, then the run resumes from a checkpoint at step 1
    records += [{"step": 2, "loss": 9.0, "tokens_seen": 2000, "throughput_tokens": 1.0},
                {"step": 2, "eval/perplexity": 20.0}]
    run = compare.load_run(_write_run(tmp_path / "r", {"name": "r"}, records))
    assert run.train == [(1000, 4.9), (2000, 9.0)]
    assert run.evals == [(1000, 40.0), (2000, 20.0)]


def test_best_per_optimizer(tmp_path):
    runs = [
        _write_run(tmp_path / "a1", {"name": "a-lr1", "optimizer": "adamw", "lr": 1}, _records([50.0, 40.0])),
        _write_run(tmp_path / "a2", {"name": "a-lr2", "optimizer": "adamw", "lr": 2}, _records([45.0, 42.0])),
        _write_run(tmp_path / "m1", {"name": "m-lr1", "optimizer": "apollo_mini", "lr": 1}, _records([60.0, 39.0])),
    ]
    compare.compare([str(r) for r in runs], tmp_path / "out", best_per_key="optimizer")
    text = (tmp_path / "out" / "comparison.md").read_text()
    best, everything = text.split("All runs:")
    assert "| m-lr1 |" in best and "| a-lr1 |" in best and "| a-lr2 |" not in best
    assert everything.count("\n| ") == 1 + 3  # header + 3 runs


def test_runs_that_share_a_name_are_told_apart_by_their_optimizer(tmp_path):
    """Sweeps of different optimizers all name their runs train-lr...: the table and legend prefix the optimizer."""
    runs = [
        _write_run(tmp_path / "a", {"name": "train-lr1", "optimizer": "adamw"}, _records([50.0, 40.0])),
        _write_run(tmp_path / "m", {"name": "train-lr1", "optimizer": "apollo_mini"}, _records([60.0, 39.0])),
        _write_run(tmp_path / "u", {"name": "train-lr2", "optimizer": "apollo"}, _records([60.0, 38.0])),
    ]
    loaded = compare.compare([str(r) for r in runs], tmp_path / "out")
    assert [run.name for run in loaded] == ["adamw train-lr1", "apollo_mini train-lr1", "train-lr2"]
    text = (tmp_path / "out" / "comparison.md").read_text()
    assert "| adamw train-lr1 |" in text and "| apollo_mini train-lr1 |" in text and "| train-lr2 |" in text
