"""Two CPU processes under torchrun (gloo): APOLLO keeps the replicas identical, checkpoints resume exactly."""
import json

import pytest
import torch

from tests.train.test_cli import read_metrics, run_train, tiny_args, weights


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, c4_dir, tokenizer_dir):
    folder = tmp_path_factory.mktemp("ddp")
    # micro-batch 2 x accumulation 2 x 2 processes = 8 sequences per update
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", optimizer="apollo", rank=4, update_proj_gap=2,
                     total_batch_size=8, num_training_steps=4, save_every=2, eval_every=2)
    run_train(argv, nproc=2)
    return folder, argv


def test_replicas_stay_identical_with_apollo(ddp_run):
    folder, _ = ddp_run
    run = folder / "run"
    records = read_metrics(run)
    final = records[-1]
    assert final["replicas_identical"] is True
    assert len(final["param_checksums"]) == 2 and final["param_checksums"][0] == final["param_checksums"][1]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["gradient_accumulation"] == 2
    assert sorted(p.name for p in (run / "step_0000004").glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


@pytest.mark.slow
def test_ddp_resume_is_bit_exact(ddp_run):
    folder, argv = ddp_run
    resumed = folder / "resumed"
    run_train(argv + ["--continue_from", str(folder / "run" / "step_0000002"), "--save_dir", str(resumed)], nproc=2)
    expected, got = weights(folder / "run" / "step_0000004"), weights(resumed / "step_0000004")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
