"""A save that fails or is killed at any moment loses nothing.

Every file-system operation of a save is an event (folder creation, each file opened for writing and
half written, the safetensors write, each fsync, chmod, rename, rmtree). A full disk (ENOSPC) is raised
at every event in this process, a SIGKILL is delivered at every event in a forked child; after each, the
run folder holds no temporary folder, the newest complete checkpoint is the previous one (or the new
one once the rename committed it), and it loads to exactly the state that was saved. A real writer
failure comes from the kernel under RLIMIT_FSIZE; the CLI stops with one line and the run resumes
bit-exactly; with 2 ranks (gloo) a failing rank makes every rank fail and clean up, for DDP and FSDP
(torch.distributed.checkpoint) saves alike.
"""
import copy
import errno
import os
import pathlib
import resource
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import train.checkpoint as ckpt
import train.checkpoint.save as ckpt_save
from tests.train.test_checkpoint import make, save, train_steps
from train.checkpoint import (CheckpointSaveError, checkpoint_path, damage, find_checkpoint, load_checkpoint,
                              verify_sums)

LEFTOVER = (".tmp-", ".old-", ".del-")


class Faults:
    """Numbers the file-system events of a save; at event `at` raises ENOSPC or SIGKILLs this process.

    `install` shadows `open` in train.checkpoint.save and patches save_model, os.fsync, Path.mkdir/rename/chmod
    and shutil.rmtree. A write event happens after half of the file's bytes reached the disk. fsync does
    nothing here (speed; durability is not what these tests measure).
    """

    def __init__(self, at: int | None = None, action: str = "enospc"):
        self.at, self.action, self.events = at, action, []

    def event(self, name: str, *, disk_can_fill: bool = True) -> None:
        self.events.append(name)
        if len(self.events) - 1 != self.at:
            return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if disk_can_fill:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    def install(self, patch) -> None:
        faults, real_open, real_save_model = self, open, ckpt_save.save_model
        real_mkdir, real_rename, real_chmod, real_rmtree = (pathlib.Path.mkdir, pathlib.Path.rename, pathlib.Path.chmod,
                                                            shutil.rmtree)

        class File:
            def __init__(self, path, mode):
                self.name, self.file, self.first = Path(path).name, real_open(path, mode), True

            def write(self, data):
                data = memoryview(data).cast("B")
                if self.first and faults.at == len(faults.events):  # fail half-way through this file
                    self.file.write(data[: len(data) // 2])
                    self.file.flush()
                if self.first:
                    self.first = False
                    faults.event(f"write {self.name}")
                return self.file.write(data)

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        def fake_open(path, mode="r", *args, **kwargs):
            if "w" not in mode:
                return real_open(path, mode, *args, **kwargs)
            faults.event(f"open {Path(path).name}")
            return File(path, mode)

        def save_model(model, filename, *args, **kwargs):
            faults.event("save_model")
            real_save_model(model, filename, *args, **kwargs)
            if faults.at == len(faults.events):  # the fault comes with half of the file on the disk
                os.truncate(filename, os.path.getsize(filename) // 2)
                if faults.action == "enospc":  # what the safetensors (Rust) writer raises
                    faults.events.append("write model.safetensors")
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            faults.event("write model.safetensors")

        patch(ckpt_save, "open", fake_open, raising=False)
        patch(ckpt_save, "save_model", save_model)
        patch(os, "fsync", lambda fd: faults.event("fsync"))
        patch(pathlib.Path, "mkdir", lambda self, *a, **k: (faults.event(f"mkdir {self.name}"), real_mkdir(self, *a, **k))[1])
        patch(pathlib.Path, "rename", lambda self, target: (faults.event(f"rename {self.name}"), real_rename(self, target))[1])
        patch(pathlib.Path, "chmod", lambda self, mode: (faults.event("chmod", disk_can_fill=False), real_chmod(self, mode))[1])
        patch(shutil, "rmtree", lambda path, *a, **k: (faults.event(f"rmtree {Path(path).name}", disk_can_fill=False),
                                                      real_rmtree(path, *a, **k))[1])


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """fsync costs tens of milliseconds here and proves nothing a test can observe (no power is cut)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def setattr_now(target, name, value, raising=True):
    """The `patch` of a forked child: plain setattr (the child dies after the save)."""
    setattr(target, name, value)


def snapshot(model, optimizer):
    return {key: value.clone() for key, value in model.state_dict().items()}, copy.deepcopy(optimizer.state_dict())


def assert_loads_to(checkpoint, expected, name="apollo"):
    """`checkpoint` passes every check and loads to exactly the snapshot `expected` (weights and optimizer state)."""
    assert damage(checkpoint) is None and verify_sums(checkpoint) is None
    model, optimizer = make(name, rank=2)
    load_checkpoint(checkpoint, model=model, optimizer=optimizer)
    weights, state = expected
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    loaded = optimizer.state_dict()
    assert loaded["param_groups"] == state["param_groups"]
    for index, entries in state["state"].items():
        for key, value in entries.items():
            got = loaded["state"][index][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (index, key)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A run folder with step 3 (and one with steps 3 and 6), the model at update 6, and the saved states."""
    root = tmp_path_factory.mktemp("history")
    model, optimizer = make("apollo", rank=2, update_proj_gap=2)
    train_steps(model, optimizer, 3, generator_seed=1)
    save(root / "one", 3, model, optimizer)
    states = {3: snapshot(model, optimizer)}
    train_steps(model, optimizer, 3, generator_seed=2)
    shutil.copytree(root / "one", root / "two")
    save(root / "two", 6, model, optimizer)
    states["6-old"] = snapshot(model, optimizer)
    train_steps(model, optimizer, 1, generator_seed=3)  # what the failing save of update 6 holds
    states["6-new"] = snapshot(model, optimizer)
    return {"root": root, "model": model, "optimizer": optimizer, "states": states}


def events_of_a_save(history, folder, tmp_path, monkeypatch):
    """The event names of a fault-free save of update 6 into a copy of `folder`."""
    faults = Faults()
    with monkeypatch.context() as patch:
        faults.install(patch.setattr)
        save(shutil.copytree(history["root"] / folder, tmp_path / "trace"), 6, history["model"], history["optimizer"])
    return faults.events


def check_after_fault(run: Path, history, folder: str, committed: bool) -> Path:
    """No leftover folder; the newest complete checkpoint is the previous one, or the new one once committed."""
    assert not [p.name for p in run.iterdir() if p.name.startswith(LEFTOVER)]
    newest = find_checkpoint(run)
    expected = "6-new" if committed else ("6-old" if folder == "two" else 3)
    assert newest == checkpoint_path(run, 6 if expected != 3 else 3), newest
    assert_loads_to(newest, history["states"][expected])
    assert verify_sums(checkpoint_path(run, 3)) is None  # the older one untouched, byte for byte
    return newest


@pytest.mark.parametrize("folder", ["one", "two"], ids=["new-step", "re-save"])
def test_a_full_disk_at_any_moment_of_a_save_loses_nothing(folder, history, tmp_path, monkeypatch):
    events = events_of_a_save(history, folder, tmp_path, monkeypatch)
    commit = events.index("rename .tmp-step_0000006")
    assert {"save_model", "write model.safetensors", "write optimizer.pt", "write rank_00000.pt", "open manifest.json",
            "fsync", "mkdir .tmp-step_0000006"} <= set(events)
    tried = 0
    for at, name in enumerate(events):
        if name.startswith(("chmod", "rmtree")):  # deleting and chmod need no space
            continue
        run = shutil.copytree(history["root"] / folder, tmp_path / f"run{at}")
        faults = Faults(at)
        with monkeypatch.context() as patch:
            faults.install(patch.setattr)
            if at <= commit:
                with pytest.raises(CheckpointSaveError) as raised:
                    save(run, 6, history["model"], history["optimizer"])
            else:  # the fsync of the run folder after the commit: best effort
                save(run, 6, history["model"], history["optimizer"])
        if at <= commit:
            message = str(raised.value)
            assert raised.value.disk_full and "the disk is full (No space left on device" in message, message
            assert len(message.splitlines()) == 1 and "was not saved" in message
            assert f"newest complete checkpoint is {run / ('step_0000006' if folder == 'two' else 'step_0000003')}" in message
            if name.startswith(("write", "open")):
                assert name.split()[-1] in message, (name, message)
        check_after_fault(run, history, folder, committed=at > commit)
        tried += 1
    assert tried >= 15
    print(f"ENOSPC at {tried} of the {len(events)} events of a save ({folder})")


def test_after_a_failed_save_the_previous_checkpoint_resumes_bit_exactly(history, tmp_path, monkeypatch):
    run = shutil.copytree(history["root"] / "one", tmp_path / "run")
    faults = Faults(at=None)
    with monkeypatch.context() as patch:
        faults.install(patch.setattr)
        faults.at = 4  # somewhere inside the files
        with pytest.raises(CheckpointSaveError):
            save(run, 6, history["model"], history["optimizer"])
    model, optimizer = make("apollo", rank=2, update_proj_gap=2)
    load_checkpoint(find_checkpoint(run), model=model, optimizer=optimizer)
    train_steps(model, optimizer, 3, generator_seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, history["states"]["6-old"][0][key]), key


def _fork_and_kill(at, run, history) -> int:
    """Save update 6 into `run` in a forked child that SIGKILLs itself at event `at`; the child's wait status."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only writes files
        pid = os.fork()
    if pid == 0:
        try:
            Faults(at, action="kill").install(setattr_now)
            save(run, 6, history["model"], history["optimizer"])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("folder, every", [("one", False), pytest.param("one", True, marks=pytest.mark.slow),
                                           pytest.param("two", True, marks=pytest.mark.slow)],
                         ids=["new-step", "new-step-every-event", "re-save-every-event"])
def test_a_sigkill_at_any_moment_of_a_save_loses_nothing(folder, every, history, tmp_path, monkeypatch):
    """By default at the first of each run of identical events (one of the 5 fsyncs, ...); slow: at every event."""
    events = events_of_a_save(history, folder, tmp_path, monkeypatch)
    commit = events.index("rename .tmp-step_0000006")
    started = events.index("mkdir .tmp-step_0000006")
    points = [at for at, name in enumerate(events) if every or at == 0 or name != events[at - 1]]
    for at in points:
        name = events[at]
        run = shutil.copytree(history["root"] / folder, tmp_path / f"run{at}")
        status = _fork_and_kill(at, run, history)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, name, status)
        leftovers = [p.name for p in run.iterdir() if p.name.startswith(LEFTOVER)]
        newest = find_checkpoint(run)
        expected = "6-new" if at > commit else ("6-old" if folder == "two" else 3)
        assert_loads_to(newest, history["states"][expected])
        # the next save tidies whatever the kill left and lands complete
        save(run, 6, history["model"], history["optimizer"])
        assert not [p.name for p in run.iterdir() if p.name.startswith(LEFTOVER)], (at, name)
        assert find_checkpoint(run) == checkpoint_path(run, 6) and verify_sums(checkpoint_path(run, 6)) is None
        if started < at <= commit:  # killed mid-save: the evidence is the temporary folder the next save removed
            assert ".tmp-step_0000006" in leftovers, (at, name, leftovers)
    print(f"SIGKILL at {len(points)} of the {len(events)} events of a save ({folder})")


def test_a_killed_re_save_is_recovered_from_its_old_half(history, tmp_path, monkeypatch):
    """Killed between moving step_6 aside and renaming the new one in: the old step_6 stays the newest."""
    events = events_of_a_save(history, "two", tmp_path, monkeypatch)
    at = events.index("rename .tmp-step_0000006")
    assert events[at - 1] == "rename step_0000006"  # step_6 moved to .old-step_6 just before
    run = shutil.copytree(history["root"] / "two", tmp_path / "run")
    status = _fork_and_kill(at, run, history)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in run.iterdir()) == [".old-step_0000006", ".tmp-step_0000006", "step_0000003"]
    assert find_checkpoint(run).name == ".old-step_0000006"
    assert_loads_to(find_checkpoint(run), history["states"]["6-old"])


def test_a_real_file_size_limit_fails_the_save_cleanly(history, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG) inside torch's and safetensors' own writers."""
    for limit, culprit in ((4096, "rank_00000.pt"), (None, "model.safetensors")):
        run = shutil.copytree(history["root"] / "one", tmp_path / f"run-{culprit}")
        model = torch.nn.Linear(64, 256, bias=False)  # 64 KiB of weights: larger than the rank file
        optimizer = torch.optim.AdamW(model.parameters())
        rank_bytes = (run / "step_0000003" / "rank_00000.pt").stat().st_size
        limit = limit or rank_bytes * 2
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 3
            try:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                save(run, 6, model, optimizer)
            except CheckpointSaveError as error:
                os.write(write, str(error).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        message = os.read(read, 10_000).decode()
        os.close(read)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, message)
        assert f"writing {run / '.tmp-step_0000006' / culprit} failed (File too large)" in message, message
        assert sorted(p.name for p in run.iterdir()) == ["step_0000003"]
        assert_loads_to(find_checkpoint(run), history["states"][3])


# -- the CLI: one line, exit 1, and the run resumes bit-exactly --------------------------------------


@pytest.fixture()
def small_shuffle_buffer(monkeypatch):
    """The real loader with a 16-document shuffle buffer: a tiny run starts in seconds, not after 10k documents."""
    import functools

    import train.loop

    monkeypatch.setattr(train.loop, "build_train_loader", functools.partial(train.loop.build_train_loader, shuffle_buffer=16))


def test_the_cli_stops_on_a_full_disk_with_one_line_and_the_run_resumes_bit_exactly(
        tmp_path, c4_dir, tokenizer_dir, monkeypatch, capsys, small_shuffle_buffer):
    """The failing save wrote the weights of update 4 whole before "the disk filled": they are the reference.

    Then the finished run is extended from 4 to 6 updates: the cosine schedule is recomputed for 6.
    """
    import math

    from safetensors.torch import load_file

    from tests.train.test_cli import read_metrics, tiny_args, weights
    from train import __main__ as cli

    flags = dict(num_training_steps=4, save_every=2, eval_every=100, keep_last=1)
    run, reference = tmp_path / "run", tmp_path / "reference.safetensors"
    calls, real = [], ckpt_save.save_model

    def second_save_fills_the_disk(model, filename, *args, **kwargs):
        calls.append(filename)
        real(model, filename, *args, **kwargs)
        if len(calls) == 2:
            shutil.copy(filename, reference)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(ckpt_save, "save_model", second_save_fills_the_disk)
        assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **flags)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: checkpoint {run / 'step_0000004'} was not saved: the disk is full (No space left on device "
                      f"writing {run / '.tmp-step_0000004' / 'model.safetensors'}); its temporary folder was removed and "
                      f"the newest complete checkpoint is {run / 'step_0000002'}: free space, then resume with "
                      f"--continue_from {run}"], err[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("step_", ".tmp"))) == ["step_0000002"]

    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **flags) + ["--continue_from", str(run)]
    assert cli.main(argv) == 0
    expected, got = load_file(reference), weights(run / "step_0000004")
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_0000004"]  # --keep_last 1

    extended = tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **{**flags, "num_training_steps": 6})
    assert cli.main(extended + ["--continue_from", str(run)]) == 0
    lr = {record["step"]: record["lr"] for record in read_metrics(run) if "loss" in record}
    cosine = lambda k, n: 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 1) / (n - 1))))  # update k+1, warmup 1
    assert [lr[step] for step in (3, 4)] == pytest.approx([cosine(2, 4), cosine(3, 4)], rel=1e-12)  # planned for 4
    assert [lr[step] for step in (5, 6)] == pytest.approx([cosine(4, 6), cosine(5, 6)], rel=1e-12)  # re-stretched to 6
    assert lr[5] > lr[4]  # the jump at the resume point
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_0000006"]


# -- two ranks (gloo): a rank that fails makes every rank fail; the previous checkpoint stays newest -----


def _two_rank_worker(rank, init_file, root, kinds, kill):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for sharded in kinds:
        _fail_one_rank(rank, Path(root) / ("fsdp" if sharded else "ddp"), sharded, kill)
    dist.destroy_process_group()


def _fail_one_rank(rank, root, sharded, kill):
    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystem

    import apollo
    torch.manual_seed(0)
    model, _ = make("adamw")
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    optimizer = apollo.build_optimizer("adamw", model, lr=0.01)
    train_steps(model, optimizer, 2, generator_seed=1)
    save(root, 2, model, optimizer, rank=rank, sharded=sharded)
    local = {key: (value.to_local() if hasattr(value, "to_local") else value).clone()
             for key, value in model.state_dict().items()}
    train_steps(model, optimizer, 1, generator_seed=2)

    if rank == 1:  # rank 1's disk is full (or rank 1 is killed) when it writes its part of update 3
        def fail(name):
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))

        if sharded:
            real_stream = FileSystem.create_stream

            def create_stream(self, path, mode):
                if "w" in mode and ".distcp" in str(path):
                    fail(path)
                return real_stream(self, path, mode)

            FileSystem.create_stream = create_stream
        else:
            ckpt_save.open = lambda path, mode="r", *a, **k: fail(path) if "w" in mode else open(path, mode, *a, **k)
    try:
        save(root, 3, model, optimizer, rank=rank, sharded=sharded)
        raise AssertionError(f"rank {rank}: the save of update 3 succeeded")
    except CheckpointSaveError as error:
        message = str(error)
    assert "the disk is full" in message and f"newest complete checkpoint is {root / 'step_0000002'}" in message, message
    assert sharded or "rank_00001.pt" in message, message
    dist.barrier()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]
    # every rank loads update 2 back exactly (its own shards with FSDP)
    torch.manual_seed(1)
    fresh, _ = make("adamw")
    if sharded:
        fully_shard(fresh, mesh=init_device_mesh("cpu", (2,)))
    fresh_optimizer = apollo.build_optimizer("adamw", fresh, lr=0.01)
    load_checkpoint(root / "step_0000002", model=fresh, optimizer=fresh_optimizer, rank=rank)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.to_local() if hasattr(value, "to_local") else value, local[key]), key
    if sharded and rank == 0:  # the shapes check reads DCP's metadata against an unsharded meta model
        with torch.device("meta"):
            meta, _ = make("adamw")
        ckpt.check_fits(root / "step_0000002", meta, None)
    if rank == 1:  # undo the fault
        ckpt_save.__dict__.pop("open", None)
        if sharded:
            FileSystem.create_stream = real_stream


def test_a_rank_with_a_full_disk_fails_every_rank_and_leaves_the_previous_checkpoint(tmp_path):
    """DDP (rank 1 cannot write its rank file) and FSDP (rank 1 cannot write its DCP shard), in one pair of processes."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), (False, True), False), nprocs=2, join=True)


@pytest.mark.slow
def test_a_rank_killed_inside_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    run = tmp_path / "fsdp"
    with pytest.raises(mp.ProcessExitedException, match="signal"):
        mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), (True,), True), nprocs=2, join=True)
    assert find_checkpoint(run) == checkpoint_path(run, 2) and verify_sums(checkpoint_path(run, 2)) is None
    assert not (run / "step_0000003").exists()
