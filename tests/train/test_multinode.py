"""Beyond one machine, on one CPU machine (gloo): the recipes' multi-node launch, one clean error before
torchrun, the restart store, and (slow) runs that survive a killed worker or a requeue.

The slow tests run a tiny recipe (a script that sources scripts/benchmark_c4/common.sh, as every recipe
does) through bash: two "nodes" (two torchrun launchers meeting at a c10d rendezvous on 127.0.0.1) equal
the 2-process single-node run bit for bit; a worker SIGKILLed after the first checkpoint under
MAX_RESTARTS=1, and a job killed and started again with the same command, both end with the weights of
the uninterrupted run, bit for bit.
"""
import os
import shlex
import signal
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.train.test_cli import write_tiny_config
from train.distributed import attempt_store

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts" / "benchmark_c4"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _print_command(script: Path, env: dict) -> list[str]:
    out = subprocess.run(["bash", str(script)], env={**os.environ, **env, "PRINT_COMMAND": "1"}, capture_output=True,
                         text=True, check=True).stdout
    return shlex.split(out)


def test_the_7b_recipe_on_two_nodes_of_8_gpus():
    command = _print_command(SCRIPTS / "llama_7b_apollo.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"})
    launcher = command[:command.index("-m")]
    assert launcher == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                        "node0:29500", "--rdzv_id", "llama_7b_apollo", "--rdzv_conf", "join_timeout=600",
                        "--node_rank", "1"], launcher
    flag = lambda name: command[command.index(name) + 1]
    # 512 sequences over 2 x 8 processes: 32 each, micro-batch 16 x 2 accumulation
    assert (flag("--batch_size"), flag("--gradient_accumulation"), flag("--total_batch_size")) == ("16", "2", "512")
    assert flag("--save_dir") == "checkpoints/llama_7b_apollo"  # fixed: a requeued job finds its checkpoints
    single = _print_command(SCRIPTS / "llama_7b_apollo.sh", {"MAX_RESTARTS": "3"})
    assert single[:6] == ["torchrun", "--standalone", "--nproc_per_node", "8", "--max_restarts", "3"], single
    assert single[single.index("--gradient_accumulation") + 1] == "4"


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    result = subprocess.run(["bash", str(SCRIPTS / "llama_7b_apollo.sh")], capture_output=True, text=True,
                            env={**os.environ, "NNODES": "3", "MASTER_ADDR": "node0", "PRINT_COMMAND": "1"})
    assert (result.returncode, result.stderr) == (2, "error: TOTAL_BATCH 512 is not divisible by NNODES 3 x NGPU 8\n")


def tiny_recipe(folder: Path, c4_dir: Path, optimizer: str = "adamw", steps: int = 8) -> Path:
    """A recipe like scripts/benchmark_c4's: sources common.sh and calls launch with a tiny model's flags."""
    script = folder / "tiny_recipe.sh"
    script.write_text(
        "#!/usr/bin/env bash\nDEFAULT_NGPU=2\n"
        f"source {SCRIPTS / 'common.sh'}\n"
        f"launch 2 --model_config {write_tiny_config(folder)} --optimizer {optimizer} --lr 0.01 --dtype float32 "
        f"--num_training_steps {steps} --warmup_steps 1 --eval_every 100 --eval_tokens 200 --save_every 2 --workers 0 "
        f"--seed 3 --name tiny \"$@\"\n")
    return script


def recipe_env(c4_dir, tokenizer_dir, save_dir: Path, **more) -> dict:
    env = {**os.environ, "DATA_DIR": str(c4_dir), "TOKENIZER": str(tokenizer_dir), "WANDB_MODE": "disabled",
           "MAX_LENGTH": "32", "TOTAL_BATCH": "8", "SAVE_DIR": str(save_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return {**env, **{key: str(value) for key, value in more.items()}}


def test_a_bad_flag_is_one_line_and_exit_2_before_torchrun(tmp_path, c4_dir, tokenizer_dir):
    script = tiny_recipe(tmp_path, c4_dir)
    result = subprocess.run(["bash", str(script), "--lr", "nan"], capture_output=True, text=True, timeout=120,
                            env=recipe_env(c4_dir, tokenizer_dir, tmp_path / "run"))
    assert (result.returncode, result.stderr) == (2, "error: --lr must be a finite number, got nan\n"), result.stderr
    assert not (tmp_path / "run").exists()


def test_each_restart_attempt_sees_its_own_keys_in_the_agents_store(monkeypatch):
    """The process group's keys of a killed attempt (its ranks' addresses) are invisible to the next attempt."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert attempt_store(2, timedelta(seconds=10)) is None  # a plain torchrun-less process: env:// as before
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store(2, timedelta(seconds=10))
    first.set("rank_1_address", "dead:1234")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store(2, timedelta(seconds=10))
    assert not second.check(["rank_1_address"]) and first.check(["rank_1_address"])
    assert server.get("attempt_0/rank_1_address") == b"dead:1234"
    second.set("rank_1_address", "alive:5678")
    assert server.get("attempt_1/rank_1_address") == b"alive:5678"


# -- slow: real torchrun launches ------------------------------------------------------------------------------


def final_weights(save_dir: Path, steps: int = 8) -> dict[str, torch.Tensor]:
    return load_file(save_dir / f"step_{steps:07d}" / "model.safetensors")


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, c4_dir, tokenizer_dir):
    """The uninterrupted 2-process single-node run of the tiny recipe."""
    folder = tmp_path_factory.mktemp("reference")
    script = tiny_recipe(folder, c4_dir)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600,
                            env=recipe_env(c4_dir, tokenizer_dir, folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"weights": final_weights(folder / "run"), "script": script}


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_the_single_node_run(reference, tmp_path, c4_dir, tokenizer_dir):
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(["bash", str(reference["script"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=recipe_env(c4_dir, tokenizer_dir, tmp_path / "run", NNODES=2, NGPU=1,
                                                        NODE_RANK=rank, RDZV_ENDPOINT=endpoint, JOIN_TIMEOUT=120))
             for rank in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_bit_identical(final_weights(tmp_path / "run"), reference["weights"])


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    """The trainer processes under a recipe's torchrun (`python -m train`, not the agent)."""
    return [child for child in launcher.children(recursive=True)
            if "train" in child.cmdline() and "torch.distributed.run" not in " ".join(child.cmdline())
            and "--dry_run" not in child.cmdline()]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_a_killed_worker_is_restarted_and_the_run_ends_bit_identical(attempt, reference, tmp_path, c4_dir, tokenizer_dir):
    run = tmp_path / "run"
    job = subprocess.Popen(["bash", str(reference["script"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=recipe_env(c4_dir, tokenizer_dir, run, MAX_RESTARTS=1))
    _wait_for(run / "step_0000002", job)
    started = time.time()
    victim = _workers(psutil.Process(job.pid))[-1]
    victim.send_signal(signal.SIGKILL)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[:3000] + "\n...\n" + err[-3000:]
    resumed = [line for line in err.splitlines() if line.startswith("--resume auto: resuming")]
    assert resumed and "at update" in resumed[-1], err[-3000:]  # the restarted attempt resumed a checkpoint
    print(f"restart attempt {attempt}: killed pid {victim.pid}, job done {time.time() - started:.1f} s later; {resumed[-1]}")
    assert_bit_identical(final_weights(run), reference["weights"])


@pytest.mark.slow
def test_a_requeued_job_runs_the_same_command_and_ends_bit_identical(reference, tmp_path, c4_dir, tokenizer_dir):
    run = tmp_path / "run"
    env = recipe_env(c4_dir, tokenizer_dir, run)
    job = subprocess.Popen(["bash", str(reference["script"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
    _wait_for(run / "step_0000002", job)
    launcher = psutil.Process(job.pid)
    for process in [launcher, *launcher.children(recursive=True)]:  # the node is gone: no handler runs, no final save
        process.send_signal(signal.SIGKILL)  # (torchrun starts its workers in sessions of their own)
    job.communicate()
    assert not (run / "step_0000008").exists()
    again = subprocess.run(["bash", str(reference["script"])], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--resume auto: resuming" in again.stderr, again.stderr[-3000:]
    assert_bit_identical(final_weights(run), reference["weights"])
    done = subprocess.run(["bash", str(reference["script"])], capture_output=True, text=True, env=env, timeout=300)
    assert (done.returncode, done.stderr.splitlines()[-1:]) == (
        0, [f"{run}: the run is already complete (step_0000008, update 8 of 8); nothing to do"]), done.stderr
