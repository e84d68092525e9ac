"""Fira on row-sharded (FSDP2-style DTensor, Shard(0)) weights: the update of the whole matrix, 2 gloo ranks."""
import torch

import apollo
from apollo.fira import Fira
from tests.conftest import run_on_ranks

WORLD = 2
RANK = 3
# tall (right: row-local), wide (left: R summed over ranks), uneven rows both ways (15 = 8 + 7), square (right)
LOW_RANK_SHAPES = [(24, 10), (10, 24), (15, 8), (15, 20), (16, 16)]
REGULAR_SHAPES = [(7,), (9, 4)]
FORMS = {"code": {}, "paper": {"paper_form": True}}


def _tensors(steps):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in REGULAR_SHAPES + LOW_RANK_SHAPES]
    base = [torch.randn(w.shape, generator=generator) for w in weights]  # correlated: the limiter engages
    grads = [[b + 0.5 * torch.randn(b.shape, generator=generator) for b in base] for _ in range(steps)]
    return weights, grads


def _optimizer(params, form, **kwargs):
    regular, low_rank = params[:len(REGULAR_SHAPES)], params[len(REGULAR_SHAPES):]
    groups = [{"params": regular}, {"params": low_rank, "rank": RANK, "update_proj_gap": 2, **FORMS[form]}]
    return Fira(groups, lr=0.02, weight_decay=0.1, **kwargs)


def _worker(rank, world_size, steps):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    weights, grads = _tensors(steps)
    out = {}
    for form in FORMS:
        whole = [torch.nn.Parameter(w.clone()) for w in weights]
        shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
        whole_opt, shard_opt = _optimizer(whole, form), _optimizer(shards, form)
        for step_grads in grads:
            for p, q, g in zip(whole, shards, step_grads):
                p.grad = g.clone()
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            whole_opt.step()
            shard_opt.step()
        errors = [((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
                  for p, q, w in zip(whole, shards, weights)]
        norms = [(shard_opt.state[q]["limiter_norm"] / whole_opt.state[p]["limiter_norm"] - 1).abs().item()
                 for p, q in zip(whole[len(REGULAR_SHAPES):], shards[len(REGULAR_SHAPES):])]
        out[form] = (errors, norms, apollo.optimizer_state_bytes(shard_opt))
    plain = _optimizer(shards, "code", fused=False)  # the plain path has no sharded update
    try:
        plain.step()
        out["refusal"] = None
    except ValueError as error:
        out["refusal"] = str(error)
    return out


def test_sharded_fira_equals_the_whole_matrix_update(tmp_path):
    results = run_on_ranks(_worker, 5, world_size=WORLD, tmp_path=tmp_path)
    assert sorted(results) == [0, 1]
    rows = {0: lambda m: (m + 1) // 2, 1: lambda m: m - (m + 1) // 2}
    for rank, out in dict(results).items():
        for form in FORMS:
            errors, norms, state_bytes = out[form]
            assert max(errors) < 1e-5, (rank, form, errors)  # relative to each weight's total update
            assert max(norms) < 1e-5, (rank, form, norms)  # the limiter saw the norm of the whole S
            # per rank: regular moments by rows; right: P (r x n) whole, moments by rows; left: P (m x r) and
            # the r x n moments whole; a float32 limiter norm and an int step per weight
            regular = sum(2 * 4 * rows[rank](s[0]) * (s[1] if len(s) == 2 else 1) + 8 for s in REGULAR_SHAPES)
            low_rank = sum(4 * (m * RANK + 2 * RANK * n) if m < n else 4 * (RANK * n + 2 * rows[rank](m) * RANK)
                           for m, n in LOW_RANK_SHAPES) + (4 + 8) * len(LOW_RANK_SHAPES)
            assert state_bytes == regular + low_rank, (rank, state_bytes, regular + low_rank)
        assert out["refusal"] and "sharded (DTensor) parameters need the fused step" in out["refusal"]
