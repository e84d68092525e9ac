"""Row-sharded (FSDP2-style DTensor, Shard(0)) weights get the update of the whole matrix: 2 gloo ranks."""
import pytest
import torch

import apollo
from tests.conftest import run_on_ranks

WORLD = 2
# tall (right projection, row-local), wide (left: R summed over ranks), uneven rows (15 = 8 + 7), square
LOW_RANK_SHAPES = [(24, 10), (10, 24), (15, 8), (16, 16)]
REGULAR_SHAPES = [(7,), (9, 4)]

CONFIGS = {
    "apollo": (apollo.APOLLO, {"rank": 3}),
    "apollo_mini": (apollo.APOLLO, {"rank": 1, "scale_type": "tensor", "scale": 128.0}),
    "apollo_mini scale_front": (apollo.APOLLO, {"rank": 1, "scale_type": "tensor", "scale": 128.0, "scale_front": True}),
    "apollo_svd": (apollo.APOLLO, {"rank": 3, "proj": "svd"}),
    "galore": (apollo.GaLore, {"rank": 3}),
}


def _tensors(seed, steps):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=generator) for shape in REGULAR_SHAPES + LOW_RANK_SHAPES]
    base = [torch.randn(w.shape, generator=generator) for w in weights]  # correlated gradients: the limiter engages
    grads = [[b + 0.5 * torch.randn(b.shape, generator=generator) for b in base] for _ in range(steps)]
    return weights, grads


def _optimizer(cls, lowrank, params):
    regular, low_rank = params[:len(REGULAR_SHAPES)], params[len(REGULAR_SHAPES):]
    groups = [{"params": regular}, {"params": low_rank, "update_proj_gap": 2, **lowrank}]
    return cls(groups, lr=0.02, weight_decay=0.1)


def _worker(rank, world_size, name, steps):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    cls, lowrank = CONFIGS[name]
    weights, grads = _tensors(0, steps)
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    whole_opt, shard_opt = _optimizer(cls, lowrank, whole), _optimizer(cls, lowrank, shards)
    for step_grads in grads:
        for p, q, g in zip(whole, shards, step_grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        whole_opt.step()
        shard_opt.step()
    worst = max(((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
                for p, q, w in zip(whole, shards, weights))
    # the plain path (fused=False) has no sharded update: it refuses DTensor parameters
    plain = cls([{"params": shards[len(REGULAR_SHAPES):], **lowrank}], lr=0.02, fused=False)
    try:
        plain.step()
        refusal = None
    except ValueError as error:
        refusal = str(error)
    # optimizer_state_bytes counts the shard this process holds of each DTensor state
    return (worst, apollo.optimizer_state_bytes(shard_opt), apollo.optimizer_state_bytes(whole_opt),
                     refusal)


def _run(tmp_path, name, steps=5):
    results = run_on_ranks(_worker, name, steps, world_size=WORLD, tmp_path=tmp_path)
    assert sorted(results) == [0, 1]
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_update_equals_the_whole_matrix_update(tmp_path, name):
    results = _run(tmp_path, name)
    for rank, (worst, local_state, whole_state, refusal) in results.items():
        assert worst < 1e-5, (name, rank, worst)  # relative to the total update of each weight
        assert local_state < whole_state
        assert refusal is not None and "sharded (DTensor) parameters need the fused step" in refusal, refusal


def test_row_local_state_is_split_across_ranks(tmp_path):
    """APOLLO's right-projected moments and the regular moments are split by rows; left-projected ones
    (r x n) are replicated. Expected per-rank bytes, computed from the shapes."""
    results = _run(tmp_path, "apollo", steps=1)
    rank_rows = {0: lambda m: (m + 1) // 2, 1: lambda m: m - (m + 1) // 2}
    for rank, (_, local_state, whole_state, _) in results.items():
        rows = rank_rows[rank]
        regular = 2 * 4 * (rows(7) + rows(9) * 4)
        low_rank = 2 * 4 * (rows(24) * 3 + 3 * 24 + rows(15) * 3 + rows(16) * 3)  # (10, 24) is left: replicated
        ints = 8 * (len(REGULAR_SHAPES) + 2 * len(LOW_RANK_SHAPES))  # step (+ proj_seed)
        limiter = 4 * len(LOW_RANK_SHAPES)
        assert local_state == regular + low_rank + ints + limiter, (rank, local_state)
        print(f"rank {rank}: optimizer state {local_state} bytes, unsharded {whole_state}")
