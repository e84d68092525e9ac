"""Checkpoints: exact resume of weights + optimizer + RNG, weights_only loading, atomic writes, lookup."""
import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import apollo
from train.checkpoint import (
    capture_rng,
    checkpoint_path,
    checkpoint_world_size,
    find_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


class Tiny(nn.Module):
    """Names like LLaMA's, so APOLLO finds low-rank 'attn'/'mlp' weights next to regular ones."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(10, 8, dtype=dtype)
        self.attn = nn.Linear(8, 12, bias=False, dtype=dtype)
        self.mlp = nn.Linear(12, 8, bias=False, dtype=dtype)
        self.norm = nn.Parameter(torch.ones(8, dtype=dtype))

    def forward(self, ids):
        return (self.mlp(torch.relu(self.attn(self.embed(ids)))) * self.norm).pow(2).mean()


def make(name, dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = Tiny(dtype)
    return model, apollo.build_optimizer(name, model, lr=0.01, weight_decay=0.01, **options)


def train_steps(model, optimizer, steps, generator_seed):
    generator = torch.Generator().manual_seed(generator_seed)
    for _ in range(steps):
        ids = torch.randint(0, 10, (4, 5), generator=generator)
        model(ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def save(tmp_path, step, model, optimizer, **extra):
    return save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, config={"lr": 0.01},
                           trainer_state={"counters": {"step": step}}, rank_state={"data": {"position": step}, "rng": capture_rng()},
                           **extra)


@pytest.mark.parametrize("name, options", [
    ("adamw", {}),
    ("apollo", {"rank": 2, "update_proj_gap": 2}),
    ("apollo_mini", {}),
    ("galore", {"rank": 2, "update_proj_gap": 2}),
])
def test_resume_is_bit_exact(tmp_path, name, options):
    model, optimizer = make(name, **options)
    train_steps(model, optimizer, 3, generator_seed=1)
    checkpoint = save(tmp_path, 3, model, optimizer)
    train_steps(model, optimizer, 4, generator_seed=2)

    fresh_model, fresh_optimizer = make(name, **options)
    trainer_state, rank_state = load_checkpoint(checkpoint, model=fresh_model, optimizer=fresh_optimizer)
    assert trainer_state == {"counters": {"step": 3}} and rank_state["data"] == {"position": 3}
    train_steps(fresh_model, fresh_optimizer, 4, generator_seed=2)
    for (key, expected), got in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(expected, got), key


def test_bfloat16_weights_keep_float32_optimizer_states(tmp_path):
    model, optimizer = make("apollo", torch.bfloat16, rank=2, state_dtype="float32")
    train_steps(model, optimizer, 2, generator_seed=1)
    checkpoint = save(tmp_path, 2, model, optimizer)
    fresh_model, fresh_optimizer = make("apollo", torch.bfloat16, rank=2, state_dtype="float32")
    load_checkpoint(checkpoint, model=fresh_model, optimizer=fresh_optimizer)
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index, values in saved.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                assert loaded[index][key].dtype == value.dtype and torch.equal(loaded[index][key], value), (index, key)
    assert fresh_model.attn.weight.dtype == torch.bfloat16


def test_files_load_without_pickled_objects(tmp_path):
    model, optimizer = make("apollo", rank=2)
    train_steps(model, optimizer, 1, generator_seed=1)
    checkpoint = save(tmp_path, 1, model, optimizer)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "rank_00000.pt", "trainer.pt"]
    for path in checkpoint.glob("*.pt"):
        torch.load(path, weights_only=True)
    assert set(safetensors.torch.load_file(checkpoint / "model.safetensors")) == set(model.state_dict())
    assert json.loads((checkpoint / "config.json").read_text()) == {"lr": 0.01}
    assert checkpoint_world_size(checkpoint) == 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_save_is_atomic_and_replaces_a_previous_save(tmp_path):
    model, optimizer = make("adamw")
    save(tmp_path, 5, model, optimizer)
    crashed = tmp_path / ".tmp-step_0000009"  # a save that died half-way
    crashed.mkdir()
    (crashed / "trainer.pt").write_bytes(b"partial")
    assert find_checkpoint(tmp_path) == checkpoint_path(tmp_path, 5)

    train_steps(model, optimizer, 1, generator_seed=1)
    again = save(tmp_path, 5, model, optimizer)
    loaded = safetensors.torch.load_file(again / "model.safetensors")
    assert torch.equal(loaded["attn.weight"], model.attn.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_0000009", "step_0000005"]


def test_find_checkpoint_picks_the_latest_by_step(tmp_path):
    model, optimizer = make("adamw")
    for step in (9, 10, 100):
        save(tmp_path, step, model, optimizer)
    assert find_checkpoint(tmp_path).name == "step_0000100"
    assert find_checkpoint(tmp_path / "step_0000009").name == "step_0000009"


@pytest.mark.parametrize("setup, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root, "holds no checkpoint"),
    (lambda root: (root / "step_0000001").mkdir() or (root / "step_0000001" / "trainer.pt").touch() or root, "incomplete"),
])
def test_find_checkpoint_errors(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        find_checkpoint(setup(tmp_path))
