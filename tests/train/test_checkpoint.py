"""Checkpoints: exact resume of weights + optimizer + RNG, weights_only loading, atomic writes, lookup, the manifest,
damaged checkpoints named and skipped, shapes checked against the model, pruning, file permissions."""
import json
import os
import random
import zlib

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import apollo
from train.checkpoint import (
    CheckpointError,
    capture_rng,
    check_fits,
    checkpoint_path,
    checkpoint_world_size,
    damage,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    select_checkpoint,
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
        "config.json", "manifest.json", "model.safetensors", "optimizer.pt", "rank_00000.pt", "trainer.pt"]
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005"]  # the next save removed the dead one


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


# -- the manifest, damage, fit, pruning, permissions ---------------------------------------------------


def test_the_manifest_holds_every_file_size_and_crc32(tmp_path):
    model, optimizer = make("apollo", rank=2)
    checkpoint = save(tmp_path, 1, model, optimizer)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"]) == (1, 1)
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files
    for name in files:
        data = (checkpoint / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "crc32": zlib.crc32(data)}, name


def _saved(tmp_path, step=1):
    model, optimizer = make("apollo", rank=2)
    train_steps(model, optimizer, 1, generator_seed=1)
    return save(tmp_path, step, model, optimizer)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 9] ^= 0xFF  # inside the last tensor's data: the structure stays readable
    path.write_bytes(bytes(data))


DAMAGE = [  # (what is done to a checkpoint, the text naming the file)
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors: {size} bytes where the manifest says"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt: missing"),
    (lambda c: (c / "rank_00000.pt").write_bytes(b"garbage"), "rank_00000.pt: 7 bytes where the manifest says"),
    (lambda c: (c / "manifest.json").write_text("{"), "manifest.json: unreadable manifest"),
    (lambda c: (c / "manifest.json").unlink() or _truncate(c / "optimizer.pt"), "optimizer.pt: truncated or corrupt"),
    (lambda c: (c / "manifest.json").unlink() or (c / "model.safetensors").write_bytes(b"\xff" * 64),
     "model.safetensors: truncated or corrupt (header of"),
    (lambda c: (c / "manifest.json").unlink() or (c / "trainer.pt").unlink(), "is incomplete: missing trainer.pt"),
]


@pytest.mark.parametrize("spoil, message", DAMAGE, ids=range(len(DAMAGE)))
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, spoil, message):
    checkpoint = _saved(tmp_path)
    spoil(checkpoint)
    size = (checkpoint / "model.safetensors").stat().st_size
    assert message.format(size=size) in damage(checkpoint)
    with pytest.raises(CheckpointError, match="checkpoint .*" + message.split(":")[0]):
        select_checkpoint(checkpoint)


def test_a_corrupt_byte_is_found_by_its_crc32_when_loading(tmp_path):
    checkpoint = _saved(tmp_path)
    _flip_a_byte(checkpoint / "model.safetensors")
    assert damage(checkpoint) is None  # sizes and headers look fine: only the sum can tell
    model, optimizer = make("apollo", rank=2)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt \(CRC-32 [0-9a-f]{8} over \d+ bytes, the "
                                              r"manifest says [0-9a-f]{8}"):
        load_checkpoint(checkpoint, model=model, optimizer=optimizer)


def test_the_newest_complete_checkpoint_is_used_and_the_damaged_ones_named(tmp_path):
    for step in (2, 4, 6):
        _saved(tmp_path, step)
    _truncate(checkpoint_path(tmp_path, 6) / "optimizer.pt")
    (checkpoint_path(tmp_path, 4) / "config.json").unlink()
    (tmp_path / "step_0000008").mkdir()  # a folder that only looks like one
    checkpoint, skipped = select_checkpoint(tmp_path)
    assert checkpoint == checkpoint_path(tmp_path, 2)
    assert [line.split(":")[0].split(" ")[0] for line in skipped] == [
        str(tmp_path / "step_0000008"), str(checkpoint_path(tmp_path, 6) / "optimizer.pt"),
        str(checkpoint_path(tmp_path, 4) / "config.json")]
    assert find_checkpoint(tmp_path) == checkpoint


def test_shapes_that_do_not_fit_the_model_are_named(tmp_path):
    checkpoint = _saved(tmp_path)
    torch.manual_seed(0)
    model = Tiny()
    model.attn = nn.Linear(8, 16, bias=False)  # 16 outputs where 12 were saved
    model.mlp = nn.Linear(16, 8, bias=False)
    optimizer = apollo.build_optimizer("apollo", model, lr=0.01, rank=2)
    with pytest.raises(CheckpointError, match=r"model.safetensors: attn.weight has shape \[12, 8\], this model's is "
                                              r"\[16, 8\]"):
        check_fits(checkpoint, model, optimizer)
    model, _ = make("apollo", rank=2)
    with pytest.raises(CheckpointError, match=r"optimizer.pt: parameter groups \[\d+, \d+\] do not match this "
                                              r"optimizer's \[4\]"):
        check_fits(checkpoint, model, apollo.build_optimizer("adamw", model, lr=0.01))
    with torch.device("meta"):  # the preflight's meta-device copies fit
        meta, meta_optimizer = make("apollo", rank=2)
    check_fits(checkpoint, meta, meta_optimizer)


def test_keep_last_deletes_only_older_checkpoints_after_a_newer_one_is_complete(tmp_path):
    for step in (1, 2, 3):
        _saved(tmp_path, step)
    _truncate(checkpoint_path(tmp_path, 3) / "model.safetensors")  # the newest is damaged: it does not count
    assert prune_checkpoints(tmp_path, 1) == [checkpoint_path(tmp_path, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]
    assert prune_checkpoints(tmp_path, 1) == []  # step 2 is the newest complete one: never deleted
    _saved(tmp_path, 4)
    assert prune_checkpoints(tmp_path, 2) == []
    _saved(tmp_path, 5)
    assert prune_checkpoints(tmp_path, 2) == [checkpoint_path(tmp_path, 2), checkpoint_path(tmp_path, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000005"]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        prune_checkpoints(tmp_path, 0)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_gets_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        checkpoint = _saved(tmp_path)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [checkpoint, *checkpoint.rglob("*")]}
    assert modes == {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}, modes
