"""The sharded part of the contract, for every registered optimizer whose spec does not refuse --fsdp: on a tiny
LLaMA sharded by FSDP2 (`fully_shard` per decoder layer and the root, row-sharded DTensors on 2 gloo ranks),
three steps with the whole model's gradients give the whole model's weights (relative to the distance moved),
and each rank holds about half of the state. One spawn for all optimizers."""
import torch

import apollo
from tests.conftest import make_tiny_llama, run_on_ranks

SHARDED = [name for name in apollo.optimizer_names() if "fsdp" not in apollo.get_spec(name).refuses]


def _worker(rank, world_size, names):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name in names:
        spec = apollo.get_spec(name)
        whole, sharded, start = make_tiny_llama(seed=0), make_tiny_llama(seed=0), make_tiny_llama(seed=0)
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        options = dict(lr=spec.smoke_lr, weight_decay=0.1, **spec.smoke_options)
        whole_optimizer = apollo.build_optimizer(name, whole, **options)
        shard_optimizer = apollo.build_optimizer(name, sharded, **options)
        for step in range(3):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))  # same on both ranks
            whole(input_ids=ids, labels=ids).loss.backward()
            for p, q in zip(whole.parameters(), sharded.parameters()):
                q.grad = distribute_tensor(p.grad.detach().clone(), mesh, q.placements)
            whole_optimizer.step()
            shard_optimizer.step()
            whole_optimizer.zero_grad(set_to_none=True)
            shard_optimizer.zero_grad(set_to_none=True)
        errors = [((q.full_tensor() - p.detach()).norm() / ((p.detach() - w.detach()).norm() + 1e-12)).item()
                  for p, q, w in zip(whole.parameters(), sharded.parameters(), start.parameters())]
        out[name] = (max(errors), apollo.optimizer_state_bytes(shard_optimizer),
                     apollo.optimizer_state_bytes(whole_optimizer))
    return out


def test_sharded_updates_equal_the_whole_model_update(tmp_path):
    assert len(SHARDED) >= 5
    results = run_on_ranks(_worker, SHARDED, tmp_path=tmp_path)
    assert sorted(results) == [0, 1]
    for rank, by_name in results.items():
        assert sorted(by_name) == sorted(SHARDED)
        for name, (error, local_state, whole_state) in by_name.items():
            assert error < 1e-4, (rank, name, error)
            # about half the state per rank (row-split states, plus a few scalars every rank keeps)
            assert 0.4 * whole_state <= local_state <= 0.65 * whole_state, (rank, name, local_state, whole_state)
