"""End to end through `python -m train` on the local C4 sample: metrics, checkpoints, exact resume, signals, NaN."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import __main__ as cli
from train.checkpoint import find_checkpoint
from train.schedule import lr_multiplier

REPO_ROOT = Path(__file__).resolve().parents[2]

# hidden 32, 2 layers; vocab 32128 covers t5-base's 32100 ids (pieces + extra ids).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32128, "hidden_size": 32,
    "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "rope_theta": 10000.0,
    "initializer_range": 0.02, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1, "use_cache": False,
}
TRAIN_KEYS = {"step", "loss", "lr", "tokens_seen", "throughput_tokens", "grad_norm"}


def write_tiny_config(folder: Path) -> Path:
    """A LLaMA config json small enough to train a few updates in seconds on a CPU."""
    path = Path(folder) / "llama_tiny.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def tiny_args(folder: Path, c4_dir: Path, tokenizer_dir: Path, run_dir: Path, **flags) -> list[str]:
    """Flags for a tiny run (6 updates of 2 x 2 accumulation x 32 tokens); `flags` override or add."""
    args = {"model_config": write_tiny_config(folder), "data_dir": c4_dir, "tokenizer": tokenizer_dir, "max_length": 32,
            "batch_size": 2, "gradient_accumulation": 2, "num_training_steps": 6, "warmup_steps": 1, "lr": 0.01,
            "eval_every": 3, "save_every": 3, "eval_tokens": 200, "workers": 0, "dtype": "float32",
            "wandb": "disabled", "save_dir": run_dir, **flags}
    argv = []
    for name, value in args.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def train_command(argv: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "train", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train", *argv]


def run_train(argv: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (or `nproc` under torchrun) from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(train_command(argv, nproc), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(checkpoint) / "model.safetensors")


@pytest.fixture(scope="module", params=["adamw", "apollo"])
def finished_run(request, tmp_path_factory, c4_dir, tokenizer_dir):
    """An uninterrupted 6-update run (checkpoints at 3 and 6), in this process to save start-up time."""
    optimizer = request.param
    folder = tmp_path_factory.mktemp(optimizer)
    extra = {"optimizer": optimizer}
    if optimizer == "apollo":
        extra.update(rank=4, update_proj_gap=2)  # a projection refresh on each side of the resume point
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", **extra)
    assert cli.main(argv) == 0
    return {"folder": folder, "run": folder / "run", "argv": argv, "optimizer": optimizer}


def test_training_writes_metrics_config_and_checkpoints(finished_run):
    run = finished_run["run"]
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert train[0]["optimizer_state_bytes"] > 0 and "optimizer_state_bytes" not in train[1]
    expected_lr = [0.01 * lr_multiplier(k, num_training_steps=6, warmup_steps=1) for k in range(6)]
    assert [r["lr"] for r in train] == pytest.approx(expected_lr)
    tokens = [r["tokens_seen"] for r in train]
    assert tokens == sorted(tokens) and 0 < tokens[-1] <= 6 * 4 * 32
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval/perplexity"] > 1 for r in evals)
    assert records[-1]["replicas_identical"] is True

    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["gradient_accumulation"], config["total_batch_size"]) == (finished_run["optimizer"], 2, 4)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000003", "step_0000006"]
    assert json.loads((run / "step_0000006" / "config.json").read_text()) == config
    assert not list(run.glob(".tmp-*"))


def test_resume_is_bit_exact(finished_run, c4_dir, tokenizer_dir):
    """Resume at update 3: the weights after update 6 equal the uninterrupted run's, bit for bit.

    APOLLO resumes in a new process; AdamW in this one (to save start-up time).
    """
    folder, original = finished_run["folder"], finished_run["run"]
    resumed = folder / "resumed"
    argv = finished_run["argv"] + ["--continue_from", str(original / "step_0000003"), "--save_dir", str(resumed)]
    if finished_run["optimizer"] == "apollo":
        run_train(argv)
    else:
        assert cli.main(argv) == 0
    expected, got = weights(original / "step_0000006"), weights(resumed / "step_0000006")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r and r["step"] > 3]
    assert losses(resumed) == losses(original)
    assert [r["step"] for r in read_metrics(resumed) if "eval/loss" in r] == [6]  # update 3 was evaluated before the save


def test_sigterm_finishes_the_update_saves_and_exits_zero(tmp_path, c4_dir, tokenizer_dir):
    """With wandb offline: the run folder also gets wandb/offline-run-*."""
    run = tmp_path / "run"
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, num_training_steps=100_000, eval_every=100_000,
                     save_every=100_000, warmup_steps=10, wandb="offline")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(train_command(argv), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2):
            assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    checkpoint = find_checkpoint(run)
    assert checkpoint.name == f"step_{steps[-1]:07d}" and steps == list(range(1, steps[-1] + 1))
    assert "stop signal: saved update" in stderr
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run folder missing"
    counters = torch.load(checkpoint / "trainer.pt", weights_only=True)["counters"]
    assert counters["step"] == steps[-1] and counters["tokens_seen"] == read_metrics(run)[-1]["tokens_seen"]


def _poison_loss_at(monkeypatch, forward_call: int):
    """Make the model's loss NaN from its `forward_call`-th forward pass on (counting from 1)."""
    import train.loop

    real_build = train.loop.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += 1
            if module.training and calls["n"] >= forward_call:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train.loop, "build_model", build)


def test_nan_loss_stops_with_the_update_number(tmp_path, c4_dir, tokenizer_dir, monkeypatch, capsys):
    _poison_loss_at(monkeypatch, forward_call=3)  # the first micro-batch of update 2
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run")) == 1
    assert "error: loss is nan at update 2;" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


def test_nan_policy_skip_skips_the_update_and_goes_on(tmp_path, c4_dir, tokenizer_dir, monkeypatch):
    _poison_loss_at(monkeypatch, forward_call=5)  # update 3 of 4
    run = tmp_path / "run"
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, nan_policy="skip", num_training_steps=4, save_every=2, eval_every=100)
    assert cli.main(argv) == 0
    train = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert "skipped_updates" not in train[1] and train[2]["loss"] is None and train[2]["skipped_updates"] == 1
    assert train[3]["loss"] is None  # the hook poisons every later forward too; the weights stay finite
    after = weights(run / "step_0000004")
    assert all(torch.isfinite(value).all() for value in after.values())
