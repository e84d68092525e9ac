"""HSDP (--fsdp --replicate_degree 2) on 4 CPU processes (gloo): a 2 x 2 mesh, replicate x shard.

Each replica shards the weights over 2 processes; gradients are reduce-scattered inside a replica every
micro-step and all-reduced across the replicas once per update. The run ends with DDP-on-4's weights
within float32 round-off, for AdamW (elementwise) and APOLLO (whose channel norms and left projections
sum over the shard dimension only: summing over the replicas as well would double them), and resumes
bit-exactly from its sharded checkpoint. 4 processes on a 2-core machine take minutes: slow.
"""
import pytest
import torch

from tests.train.test_cli import run_train, tiny_args
from tests.train.test_fsdp import assert_ends_with_the_ddp_weights, sharded_weights

OPTIMIZERS = {"adamw": {}, "apollo": {"rank": 4, "update_proj_gap": 2}}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, c4_dir, tokenizer_dir):
    """name -> (folder, hsdp argv): DDP and HSDP runs on 4 processes, 4 updates of 2 x 2 accumulation each."""
    result = {}
    for name, flags in OPTIMIZERS.items():
        folder = tmp_path_factory.mktemp(name)
        common = dict(optimizer=name, total_batch_size=16, num_training_steps=4, save_every=2, eval_every=2, **flags)
        run_train(tiny_args(folder, c4_dir, tokenizer_dir, folder / "ddp", **common), nproc=4, timeout=900)
        argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "hsdp", fsdp=True, replicate_degree=2, **common)
        run_train(argv, nproc=4, timeout=900)
        result[name] = (folder, argv)
    return result


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hsdp_ends_with_the_ddp_weights(runs, name, tmp_path):
    assert_ends_with_the_ddp_weights(runs[name][0], "hsdp", tmp_path)


def test_hsdp_resume_is_exact(runs, tmp_path):
    folder, argv = runs["apollo"]
    resumed = folder / "resumed"
    run_train(argv + ["--continue_from", str(folder / "hsdp" / "step_0000002"), "--save_dir", str(resumed)], nproc=4,
              timeout=900)
    expected = sharded_weights(folder / "hsdp" / "step_0000004", tmp_path)
    got = sharded_weights(resumed / "step_0000004", tmp_path)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
