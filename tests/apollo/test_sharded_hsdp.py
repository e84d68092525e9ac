"""HSDP-laid-out weights ((Replicate(), Shard(0)) on a 2 x 2 replicate x shard mesh, 4 gloo ranks) get the update of
the whole matrix: the sums over a weight's rows run over the shard dimension only (summing over the replicas too
would double them), and row-local states take the weight's 2-D placements."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.apollo.test_sharded import CONFIGS, REGULAR_SHAPES, _optimizer, _tensors

WORLD, REPLICAS = 4, 2


def _worker(rank, init_file, steps, results):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (REPLICAS, WORLD // REPLICAS), mesh_dim_names=("replicate", "shard"))
        layout = [Replicate(), Shard(0)]
        out = {}
        for name, (cls, lowrank) in CONFIGS.items():
            weights, grads = _tensors(0, steps)
            whole = [torch.nn.Parameter(w.clone()) for w in weights]
            shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, layout)) for w in weights]
            whole_opt, shard_opt = _optimizer(cls, lowrank, whole), _optimizer(cls, lowrank, shards)
            for step_grads in grads:
                for p, q, g in zip(whole, shards, step_grads):
                    p.grad = g.clone()
                    q.grad = distribute_tensor(g.clone(), mesh, layout)
                whole_opt.step()
                shard_opt.step()
            worst = max(((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
                        for p, q, w in zip(whole, shards, weights))
            moment = shard_opt.state[shards[len(REGULAR_SHAPES)]]["exp_avg"]  # the tall weight: row-local moments
            out[name] = (worst, tuple(str(p) for p in moment.placements))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 4 processes: about a minute on 2 busy cores
def test_hsdp_update_equals_the_whole_matrix_update(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), 4, results), nprocs=WORLD, join=True)
    for rank, out in dict(results).items():
        for name, (worst, placements) in out.items():
            assert worst < 1e-5, (name, rank, worst)  # relative to the total update of each weight
            assert placements == ("R", "S(0)"), (name, placements)
