"""The adapters (train/adapters.py) under the harness's parallel and memory modes, through the CLI: DDP and FSDP2
(2 CPU processes, gloo), --layerwise and --compile; each resumes exactly. Multi-process or compiling runs: slow
(4 to 10 minutes on 2 shared cores)."""
import pytest
import torch

from tests.conftest import make_tiny_llama, run_on_ranks
from tests.train.test_cli import read_metrics, run_train, tiny_args, weights
from tests.train.test_fsdp import assert_ends_with_the_ddp_weights, sharded_weights

pytestmark = pytest.mark.slow
ROWS = ("lora", "low_rank")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, c4_dir, tokenizer_dir):
    """row -> (folder, {mode: argv}): DDP and FSDP2 runs of 4 updates on 2 processes, same seed."""
    result = {}
    for row in ROWS:
        folder = tmp_path_factory.mktemp(row)
        common = dict(adapter=row, lora_rank=4, total_batch_size=8, num_training_steps=4, save_every=2, eval_every=4)
        argvs = {"ddp": tiny_args(folder, c4_dir, tokenizer_dir, folder / "ddp", **common),
                 "fsdp": tiny_args(folder, c4_dir, tokenizer_dir, folder / "fsdp", fsdp=True, **common)}
        for argv in argvs.values():
            run_train(argv, nproc=2)
        result[row] = (folder, argvs)
    return result


@pytest.mark.parametrize("row", ROWS)
def test_fsdp_ends_with_the_ddp_weights_and_w0_stays(runs, row, tmp_path):
    folder, _ = runs[row]
    assert read_metrics(folder / "ddp")[-1]["replicas_identical"] is True
    assert_ends_with_the_ddp_weights(folder, "fsdp", tmp_path, frozen=lambda key: "base_layer" in key)  # W0


@pytest.mark.parametrize("row", ROWS)
def test_ddp_and_fsdp_resume_exactly(runs, row, tmp_path):
    folder, argvs = runs[row]
    for mode, argv in argvs.items():
        resumed = folder / f"resumed-{mode}"
        run_train(argv + ["--continue_from", str(folder / mode / "step_0000002"), "--save_dir", str(resumed)], nproc=2)
        if mode == "ddp":
            expected, got = weights(folder / mode / "step_0000004"), weights(resumed / "step_0000004")
        else:
            expected = sharded_weights(folder / mode / "step_0000004", tmp_path)
            got = sharded_weights(resumed / "step_0000004", tmp_path)  # named after its run folder: no clash
        for key in expected:
            assert torch.equal(expected[key], got[key]), (mode, key)


def _shard_worker(rank, world):
    """FSDP2 over an adapted tiny LLaMA: every parameter (factors and frozen W0) is a DTensor sharded over the
    2 ranks, and only W0 is frozen."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from train import adapters
    from train.distributed import shard_model

    out = {}
    for row in ROWS:
        model = make_tiny_llama(seed=0)
        config = SimpleNamespace(adapter=row, lora_rank=4, lora_alpha=32.0, lora_dropout=0.0, lora_init=None)
        counts = adapters.apply_adapter(model, config)
        shard_model(model, SimpleNamespace(device=torch.device("cpu"), world_size=world))
        params = dict(model.named_parameters())
        out[row] = {"dtensors": all(isinstance(p, DTensor) for p in params.values()),
                    "frozen": sorted(k for k, p in params.items() if not p.requires_grad),
                    "local": sum(p.to_local().numel() for p in params.values()), "total": counts["total"]}
    return out


def test_fully_shard_makes_the_adapters_dtensors(tmp_path):
    results = run_on_ranks(_shard_worker, tmp_path=tmp_path)
    assert sorted(results) == [0, 1]
    for row in ROWS:
        per_rank = [results[rank][row] for rank in (0, 1)]
        assert all(r["dtensors"] for r in per_rank)
        assert per_rank[0]["local"] + per_rank[1]["local"] == per_rank[0]["total"]  # each value on one rank
        frozen = per_rank[0]["frozen"]
        assert len(frozen) == (14 if row == "lora" else 0) and all(k.endswith("base_layer.weight") for k in frozen)


@pytest.mark.parametrize("mode", ["layerwise", "compile"])
@pytest.mark.parametrize("row", ROWS)
def test_layerwise_and_compile_train_and_resume_exactly(mode, row, tmp_path, c4_dir, tokenizer_dir):
    flags = {"layerwise": {"layerwise": True, "gradient_accumulation": 1}, "compile": {"compile": True}}[mode]
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", adapter=row, lora_rank=4, num_training_steps=4,
                     save_every=2, eval_every=4, **flags)
    run_train(argv)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    run_train(argv + ["--continue_from", str(tmp_path / "run" / "step_0000002"), "--save_dir", str(tmp_path / "res")])
    expected, got = weights(tmp_path / "run" / "step_0000004"), weights(tmp_path / "res" / "step_0000004")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [r["loss"] for r in read_metrics(tmp_path / "res") if "loss" in r] == losses[2:]
