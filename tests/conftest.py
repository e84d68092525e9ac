"""Shared fixtures: the one place that knows where the local C4 sample and t5 tokenizer live.

A missing `../shared/data` folder is a skip on a user's machine and a failure under CI (`CI=true`),
so CI can never pass by skipping the data tests.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("APOLLO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _shared_path(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        message = f"local data folder {path} not found (set APOLLO_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def c4_dir() -> Path:
    """Folder of C4-format shards: c4-train.*.json.gz and c4-validation.*.json.gz."""
    return _shared_path("c4")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The t5-base tokenizer, loadable with AutoTokenizer.from_pretrained(path)."""
    return _shared_path("t5-base")


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch):
    """No test may reach the network or a wandb account."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


def make_tiny_llama(seed: int = 0, dtype=None, device=None, **overrides):
    """A 2-layer LLaMA small enough for a step of any optimizer in milliseconds (sizes: TINY_LLAMA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(config)
    return model.to(dtype) if dtype is not None else model


@pytest.fixture
def tiny_llama():
    """Factory fixture: `tiny_llama(seed=0, dtype=None, device=None, **config overrides)`."""
    return make_tiny_llama


def run_on_ranks(worker, *args, world_size: int = 2, tmp_path) -> dict:
    """Spawn `world_size` gloo processes running `worker(rank, world_size, *args)` inside an initialised process
    group (file rendezvous under `tmp_path`); returns {rank: what the worker returned}. `worker` must be a
    module-level function (it is pickled). One spawn per test module keeps the suite fast: batch the cases."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_rank_entry, args=(worker, world_size, str(Path(tmp_path) / "rendezvous"), args, results),
             nprocs=world_size, join=True)
    return dict(results)


def _rank_entry(rank, worker, world_size, init_file, args, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
