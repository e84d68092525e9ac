"""SCALE over row-sharded (FSDP2-style DTensor, Shard(0)) weights equals the whole-matrix update: 2 gloo ranks."""
import torch

import apollo
from apollo.scale import SCALE
from tests.conftest import run_on_ranks

WORLD = 2
# row rule: tall, wide, uneven rows (15 = 8 + 7), square; column rule (rows summed over ranks): even and uneven;
# lm_head momentum (uneven); AdamW on 1-D norms (uneven and even)
GROUPS = [
    ("hidden", {"rule": "column_norm", "norm_dim": 1}, [(24, 10), (10, 24), (15, 8), (16, 16)]),
    ("embedding", {"rule": "column_norm", "norm_dim": 0}, [(16, 6), (15, 4)]),
    ("lm_head", {"rule": "momentum_column_norm", "norm_dim": 1}, [(15, 6)]),
    ("adamw", {"rule": "adamw", "lr": 0.01}, [(7,), (10,)]),
]
NORMS = ("rms", "l2")


def _tensors(seed, steps):
    generator = torch.Generator().manual_seed(seed)
    shapes = [shape for _, _, group_shapes in GROUPS for shape in group_shapes]
    weights = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(w.shape, generator=generator) for w in weights] for _ in range(steps)]
    for step_grads in grads:  # embedding rows of absent tokens are zero, on both ranks
        for g in step_grads[4:6]:
            g[::3] = 0.0
    return weights, grads


def _optimizer(params, norm):
    groups, start = [], 0
    for name, settings, shapes in GROUPS:
        groups.append({"params": params[start:start + len(shapes)], "name": name, **settings})
        start += len(shapes)
    return SCALE(groups, lr=0.05, weight_decay=0.1, norm=norm, momentum=0.8)


def _worker(rank, world_size, steps):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for norm in NORMS:
        weights, grads = _tensors(0, steps)
        whole = [torch.nn.Parameter(w.clone()) for w in weights]
        shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
        whole_opt, shard_opt = _optimizer(whole, norm), _optimizer(shards, norm)
        for step_grads in grads:
            for p, q, g in zip(whole, shards, step_grads):
                p.grad = g.clone()
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            whole_opt.step()
            shard_opt.step()
        errors = [((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
                  for p, q, w in zip(whole, shards, weights)]
        layouts = {}  # state key -> every such state is a Shard(0) DTensor
        for state in shard_opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    row_sharded = isinstance(value, DTensor) and tuple(value.placements) == (Shard(0),)
                    layouts[key] = layouts.get(key, True) and row_sharded
        out[norm] = (errors, apollo.optimizer_state_bytes(shard_opt), apollo.optimizer_state_bytes(whole_opt),
                     layouts)
    return out


def test_sharded_update_equals_the_whole_matrix_update(tmp_path):
    results = run_on_ranks(_worker, 4, world_size=WORLD, tmp_path=tmp_path)
    assert sorted(results) == [0, 1]
    rows = {0: lambda m: (m + 1) // 2, 1: lambda m: m - (m + 1) // 2}  # torch's Shard(0) split: 15 = 8 + 7
    for rank, by_norm in dict(results).items():
        for norm, (errors, local_state, whole_state, layouts) in by_norm.items():
            assert max(errors) < 1e-5, (rank, norm, errors)  # relative to each weight's total update
            # lm_head momentum (15 x 6) and the AdamW moments are split by rows; the column-norm groups hold nothing
            expected = 4 * rows[rank](15) * 6 + 2 * 4 * (rows[rank](7) + rows[rank](10)) + 8 * 2
            assert local_state == expected, (rank, norm, local_state)
            assert whole_state == 4 * 15 * 6 + 2 * 4 * 17 + 16
            assert layouts == {"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": True}, layouts
