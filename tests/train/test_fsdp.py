"""FSDP2 (--fsdp) under torchrun with 2 CPU processes (gloo): the same weights as DDP, exact resume, sharded state."""
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.train.test_cli import read_metrics, run_train, tiny_args, weights

# the tiny model's MLP has tall (gate/up, 64 x 32) and wide (down, 32 x 64) weights: both projection sides
OPTIMIZERS = {"adamw": {}, "apollo": {"rank": 4, "update_proj_gap": 2}, "apollo_mini": {"update_proj_gap": 2},
              "galore": {"rank": 4, "update_proj_gap": 2}}


def sharded_weights(checkpoint, tmp_path) -> dict[str, torch.Tensor]:
    """The model of a torch.distributed.checkpoint folder, gathered into one file."""
    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "sharded", target)
    return torch.load(target, weights_only=True)["model"]


def assert_ends_with_the_ddp_weights(folder, mode: str, tmp_path, frozen=lambda key: False) -> None:
    """`folder`/`mode` (a sharded run: fsdp, hsdp) ends at `folder`/ddp's weights after 4 updates: relative 1e-5
    of the weights (float32 round-off: the gradients are summed in another order) and a thousandth of what the
    last two updates moved them; `frozen` keys (LoRA's W0) never move and equal DDP's bit for bit; the same losses."""
    expected = weights(folder / "ddp" / "step_0000004")
    got = sharded_weights(folder / mode / "step_0000004", tmp_path)
    start = sharded_weights(folder / mode / "step_0000002", tmp_path)
    assert len(expected) > 0 and set(got) == set(expected)
    for key in expected:
        error, moved = (got[key] - expected[key]).norm(), (expected[key] - start[key]).norm()
        if frozen(key):
            assert moved == 0 and torch.equal(got[key], expected[key]), key
            continue
        assert error <= 1e-5 * expected[key].norm() and error <= 1e-3 * moved, (key, error, moved)
    ddp_loss = [r["loss"] for r in read_metrics(folder / "ddp") if "loss" in r]
    sharded_loss = [r["loss"] for r in read_metrics(folder / mode) if "loss" in r]
    assert len(ddp_loss) == 4 and sharded_loss == pytest.approx(ddp_loss, rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, c4_dir, tokenizer_dir):
    """name -> (folder, fsdp argv): a DDP and an FSDP2 run of 4 updates per optimizer, same seed."""
    result = {}
    for name, flags in OPTIMIZERS.items():
        folder = tmp_path_factory.mktemp(name)
        common = dict(optimizer=name, total_batch_size=8, num_training_steps=4, save_every=2, eval_every=2, **flags)
        run_train(tiny_args(folder, c4_dir, tokenizer_dir, folder / "ddp", **common), nproc=2)
        argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "fsdp", fsdp=True, **common)
        run_train(argv, nproc=2)
        result[name] = (folder, argv)
    return result


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp_ends_with_the_ddp_weights(runs, name, tmp_path):
    assert_ends_with_the_ddp_weights(runs[name][0], "fsdp", tmp_path)


def test_fsdp_state_per_rank_is_a_fraction_of_ddp(runs):
    for name in ("adamw", "apollo", "galore"):
        folder, _ = runs[name]
        ddp = next(r["optimizer_state_bytes"] for r in read_metrics(folder / "ddp") if "optimizer_state_bytes" in r)
        fsdp = next(r["optimizer_state_bytes"] for r in read_metrics(folder / "fsdp") if "optimizer_state_bytes" in r)
        print(f"{name}: optimizer state per rank {fsdp} bytes with FSDP2 against {ddp} with DDP ({fsdp / ddp:.2f})")
        assert fsdp < 0.75 * ddp, (name, fsdp, ddp)


@pytest.mark.parametrize("name", ["apollo", pytest.param("galore", marks=pytest.mark.slow)])
def test_fsdp_resume_is_exact(runs, name, tmp_path):
    folder, argv = runs[name]
    resumed = folder / "resumed"
    run_train(argv + ["--continue_from", str(folder / "fsdp" / "step_0000002"), "--save_dir", str(resumed)], nproc=2)
    expected = sharded_weights(folder / "fsdp" / "step_0000004", tmp_path)
    got = sharded_weights(resumed / "step_0000004", tmp_path)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_fsdp_mixed_precision_tracks_the_float32_run(runs, c4_dir, tokenizer_dir, tmp_path):
    """bfloat16 compute with float32 reduction over float32 shards: the losses follow the float32 run to
    bfloat16 precision (and differ from it: the flag does something)."""
    folder, argv = runs["apollo"]
    mixed = tmp_path / "mixed"
    run_train(argv + ["--fsdp_mixed_precision", "--save_dir", str(mixed)], nproc=2)
    full = [r["loss"] for r in read_metrics(folder / "fsdp") if "loss" in r]
    half = [r["loss"] for r in read_metrics(mixed) if "loss" in r]
    assert half == pytest.approx(full, rel=1e-2) and half != full
    assert sharded_weights(mixed / "step_0000004", tmp_path)["lm_head.weight"].dtype == torch.float32


def test_async_saves_write_the_same_checkpoints(runs, tmp_path):
    """--async_save: the shards of update 2 are written in the background while updates 3-4 train; the run
    ends with the synchronous run's weights, and both checkpoints hold its shards bit for bit, with manifests."""
    from train.checkpoint import damage, verify_sums

    folder, argv = runs["adamw"]
    asynchronous = tmp_path / "async"
    run_train(argv + ["--async_save", "--save_dir", str(asynchronous)], nproc=2)
    assert sorted(p.name for p in asynchronous.iterdir() if p.name.startswith(("step_", ".tmp"))) == [
        "step_0000002", "step_0000004"]
    for step in ("step_0000002", "step_0000004"):
        assert damage(asynchronous / step) is None and verify_sums(asynchronous / step) is None
        expected = sharded_weights(folder / "fsdp" / step, tmp_path)
        got = sharded_weights(asynchronous / step, asynchronous)
        for key in expected:
            assert torch.equal(expected[key], got[key]), (step, key)


@pytest.mark.slow
def test_a_kill_during_async_saves_loses_nothing_complete(runs, tmp_path):
    """SIGKILL of the whole job while background writes may be in flight: every step_* folder left is complete
    (manifest, CRC-32), and the same command run again resumes and ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from tests.train.test_cli import REPO_ROOT, train_command
    from train.checkpoint import damage, verify_sums

    folder, argv = runs["adamw"]
    run = tmp_path / "run"
    command = train_command(argv + ["--async_save", "--save_every", "1", "--save_dir", str(run)], nproc=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "step_0000001").exists():
        assert job.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    launcher = psutil.Process(job.pid)
    for process in [launcher, *launcher.children(recursive=True)]:  # torchrun's workers have sessions of their own
        process.send_signal(signal.SIGKILL)
    job.wait()
    assert not (run / "step_0000004").exists()
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("step_"))
    assert left and all(damage(run / name) is None and verify_sums(run / name) is None for name in left), left
    again = run_train(argv + ["--async_save", "--save_every", "1", "--save_dir", str(run)], nproc=2)
    assert "--resume auto: resuming" in again.stderr, again.stderr[-2000:]
    expected = sharded_weights(folder / "fsdp" / "step_0000004", tmp_path)
    got = sharded_weights(run / "step_0000004", run)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
