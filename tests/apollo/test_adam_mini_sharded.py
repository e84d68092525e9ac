"""Adam-mini on row-sharded (FSDP2-style DTensor, Shard(0)) weights equals the unsharded update: 2 gloo ranks.

Rows split 5 + 5 of a (10, 3) weight with 5 heads of 2 rows cut head 2 across the ranks; (9, 4) with 3 heads
of 3 rows splits 5 + 4 (head 1 cut); per-row and per-token blocks are row-local; whole-tensor blocks (1-D
and 2-D) sum their squares over ranks.
"""
import pytest
import torch

import apollo
from apollo.adam_mini import AdamMini
from tests.conftest import run_on_ranks

WORLD = 2
# (shape, block, num_heads)
PARAMS = [((10, 3), "head", 5), ((9, 4), "head", 3), ((7, 3), "row", None), ((11, 4), "row", None),
          ((7,), "tensor", None), ((5, 3), "tensor", None), ((5,), "elementwise", None)]


def _optimizer(params):
    groups = [{"params": [p], "block": block, "num_heads": heads,
               "weight_decay": 0.0 if block == "elementwise" else 0.1} for p, (_, block, heads) in zip(params, PARAMS)]
    return AdamMini(groups, lr=0.02, betas=(0.9, 0.95))


def _worker(rank, world_size, steps):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape, _, _ in PARAMS]
    # rows of different scales, so that a wrong split of a head or a missing all-reduce shows
    scales = [(1 + torch.arange(w.shape[0], dtype=w.dtype)).view(-1, *[1] * (w.dim() - 1)) for w in weights]
    grads = [[torch.randn(w.shape, generator=generator) * s for w, s in zip(weights, scales)] for _ in range(steps)]
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    whole_opt, shard_opt = _optimizer(whole), _optimizer(shards)
    for step_grads in grads:
        for p, q, g in zip(whole, shards, step_grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        whole_opt.step()
        shard_opt.step()
    errors = [((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
              for p, q, w in zip(whole, shards, weights)]
    placements = [str(shard_opt.state[q]["exp_avg_sq"].placements) for q in shards]
    return (errors, apollo.optimizer_state_bytes(shard_opt), apollo.optimizer_state_bytes(whole_opt),
                     placements)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    results = run_on_ranks(_worker, 4, world_size=WORLD, tmp_path=tmp_path_factory.mktemp("adam_mini_sharded"))
    assert sorted(results) == [0, 1]
    return results


def test_sharded_update_equals_the_whole_update(results):
    for rank, (errors, _, _, _) in results.items():
        assert max(errors) < 1e-5, (rank, errors)  # relative to each weight's total update


def test_state_follows_the_rows(results):
    """m and per-row / elementwise v: this rank's rows; v of heads and whole tensors: replicated."""
    rows = {0: lambda m: (m + 1) // 2, 1: lambda m: m - (m + 1) // 2}
    for rank, (_, local_bytes, whole_bytes, placements) in results.items():
        r = rows[rank]
        m = sum(r(shape[0]) * (shape[1] if len(shape) > 1 else 1) for shape, _, _ in PARAMS)
        v = 5 + 3 + r(7) + r(11) + 1 + 1 + r(5)
        assert local_bytes == 4 * (m + v) + 8 * len(PARAMS), rank
        assert local_bytes < whole_bytes
        assert placements == ["(Replicate(),)"] * 2 + ["(Shard(dim=0),)"] * 2 + ["(Replicate(),)"] * 2 + \
            ["(Shard(dim=0),)"]
