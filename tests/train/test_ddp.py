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


# ------------------------------------------------------------------ the wrapper: bucket views, bit for bit

from transformers import LlamaConfig  # noqa: E402

from tests.conftest import TINY_LLAMA  # noqa: E402

TINY = LlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": 2})  # GQA: k/v projections of their own shape (bucket views)


def _compare_worker(rank, world, init_file, dtypes, updates, results):
    """Plain torch DDP and BucketViewDDP side by side on the same data: gradients after every backward and
    weights after every update must be equal (torch.equal), with no_sync accumulation (3 micro-batches)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from apollo import quant
    from train import memory
    from train.distributed import BucketViewDDP, Distributed, wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ctx = Distributed(rank, rank, world, torch.device("cpu"))
        report = {}
        for dtype, int8 in dtypes:
            models = []
            for _ in range(2):
                torch.manual_seed(0)
                models.append(memory.build(TINY, dtype=dtype, device="cpu", weight_quant=int8, weight_group_size=32))
            # small buckets: DDP starts with one, rebuilds into several after the first synchronising backward
            plain = DistributedDataParallel(models[0], bucket_cap_mb=0.004)
            lean = BucketViewDDP(models[1], bucket_cap_mb=0.004)
            name = "apollo_mini" if int8 else "apollo"
            opts = [memory.optimizer_for(m, name, rank=1 if int8 else 3) for m in models]
            generator = torch.Generator().manual_seed(rank)
            storages = set()
            for _ in range(updates):
                for micro in range(3):
                    ids = torch.randint(0, 96, (2, 8), generator=generator)
                    for wrapper in (plain, lean):
                        with wrapper.no_sync() if micro < 2 else torch.enable_grad():
                            (wrapper(input_ids=ids, labels=ids).loss / 3).backward()
                    for (key, a), b in zip(models[0].named_parameters(), models[1].parameters()):
                        assert torch.equal(quant.gradient(a), quant.gradient(b)), (dtype, int8, micro, key)
                for m in models:
                    quant.all_reduce_quantized_grads(m)  # the int8 weights' own all-reduce
                for (key, a), b in zip(models[0].named_parameters(), models[1].parameters()):
                    assert torch.equal(quant.gradient(a), quant.gradient(b)), (dtype, int8, "reduced", key)
                grads = {p.grad.untyped_storage().data_ptr() for p in models[1].parameters() if p.grad is not None}
                views = {v.untyped_storage().data_ptr() for v in lean._grad_views.values()}
                assert grads == views, (dtype, int8)  # .grad are the wrapper's views, of DDP's current buckets
                storages = grads
                for opt in opts:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                for (key, a), b in zip(models[0].named_parameters(), models[1].parameters()):
                    assert torch.equal(a, b), (dtype, int8, key)
                    assert b.grad is None  # the optimizer's view: set_to_none holds
            report[(dtype, int8)] = (len(storages), sum(1 for p in models[1].parameters() if p.requires_grad),
                                     sum(p.detach().double().sum().item() for p in models[1].parameters()))
        assert type(wrap_model(torch.nn.Linear(2, 2), ctx)) is BucketViewDDP  # the trainer's wrapper
        assert type(wrap_model(torch.nn.Linear(2, 2), ctx, bucket_view=False)) is DistributedDataParallel
        results[rank] = report
    finally:
        dist.destroy_process_group()


def _compare(tmp_path, world, dtypes, updates):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_compare_worker, args=(world, str(tmp_path / "init"), dtypes, updates, results), nprocs=world, join=True)
    return dict(results)


def test_bucket_view_ddp_is_bit_identical_to_plain_ddp(tmp_path):
    """2 gloo ranks, accumulation under no_sync, float32 weights and int8 weights (their own all-reduce)."""
    results = _compare(tmp_path, 2, [("float32", False), ("float32", True)], updates=2)
    for (dtype, int8), (storages, tensors, checksum) in results[0].items():
        assert 2 <= storages < tensors  # views into DDP's (rebuilt) buckets, not tensors of their own
        assert checksum == results[1][(dtype, int8)][2]  # and the replicas agree


@pytest.mark.slow
def test_bucket_view_ddp_is_bit_identical_with_three_ranks_and_bf16(tmp_path):
    """World 3: the comm hook multiplies by 1/3 as DDP does (dividing by 3 in the buckets rounds differently)."""
    results = _compare(tmp_path, 3, [("float32", False), ("bfloat16", False)], updates=3)
    assert len(results) == 3


def test_bucket_view_ddp_refuses_a_model_with_gradients():
    from train.distributed import BucketViewDDP

    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="wrap the model before its first backward"):
        BucketViewDDP(model)
