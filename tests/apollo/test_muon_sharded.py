"""apollo.muon on row-sharded (FSDP2 DTensor, Shard(0)) weights, 2 gloo ranks: the update of the whole matrix.

One spawn runs every case (tensor-level groups with uneven rows, an FSDP2-wrapped tiny LLaMA built with
`build`, a torch.distributed.checkpoint round trip); the tests read its results.
"""
import pytest
import torch

import apollo
from apollo import muon as M
from tests.conftest import make_tiny_llama, run_on_ranks

WORLD = 2
MUON_SHAPES = [(24, 10), (10, 24), (15, 8), (16, 16)]  # tall, wide, uneven rows (15 = 8 + 7), square
ADAMW_SHAPES = [(7,), (9, 4)]
CONFIGS = {"nesterov": dict(nesterov=True), "plain momentum, match_rms_adamw": dict(nesterov=False,
                                                                                   adjust_lr_fn="match_rms_adamw")}


def _optimizer(params, **options):
    groups = [{"params": params[:len(MUON_SHAPES)], "kind": "muon", "name": "muon"},
              {"params": params[len(MUON_SHAPES):], "kind": "adamw", "name": "adamw"}]
    return M.MuonAdamW(groups, lr=0.02, weight_decay=0.1, momentum=0.9, adam_lr=0.01, **options)


def _tensor_case(mesh, options, steps=4):
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=generator) for s in MUON_SHAPES + ADAMW_SHAPES]
    grads = [[torch.randn(w.shape, generator=generator) for w in weights] for _ in range(steps)]
    whole = [torch.nn.Parameter(w.clone()) for w in weights]
    shards = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    whole_opt, shard_opt = _optimizer(whole, **options), _optimizer(shards, **options)
    for step_grads in grads:
        for p, q, g in zip(whole, shards, step_grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        whole_opt.step()
        shard_opt.step()
    equal = all(torch.equal(q.full_tensor(), p.detach()) for p, q in zip(whole, shards))
    worst = max(((q.full_tensor() - p.detach()).norm() / (p.detach() - w).norm()).item()
                for p, q, w in zip(whole, shards, weights))
    buffers = [shard_opt.state[q]["momentum_buffer"] for q in shards[:len(MUON_SHAPES)]]
    layout = [(tuple(b.placements) == (Shard(0),), tuple(b.to_local().shape)) for b in buffers]
    buffers_equal = all(torch.equal(b.full_tensor(), whole_opt.state[p]["momentum_buffer"])
                        for b, p in zip(buffers, whole))
    return dict(equal=equal, worst=worst, layout=layout, buffers_equal=buffers_equal,
                local_bytes=apollo.optimizer_state_bytes(shard_opt), whole_bytes=apollo.optimizer_state_bytes(whole_opt))


def _tiny_llama():
    return make_tiny_llama(num_key_value_heads=2)  # GQA: k/v projections of their own shape


def _fsdp_case(mesh, directory):
    """build() on an FSDP2-wrapped tiny LLaMA (every decoder layer, then the root): the unsharded run's weights;
    then a DCP save after 2 updates, a load into a fresh sharded model and optimizer, one more update each."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def sharded_model():
        model = _tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    batch = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))  # the same on both ranks

    def update(model, optimizer):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reference, model = _tiny_llama(), sharded_model()
    reference_opt = M.build(reference, lr=0.02, weight_decay=0.1, adam_lr=3e-3)
    optimizer = M.build(model, lr=0.02, weight_decay=0.1, adam_lr=3e-3)
    routed = [len(group["params"]) for group in optimizer.param_groups]
    for _ in range(2):
        update(reference, reference_opt)
        update(model, optimizer)
    dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), checkpoint_id=directory)
    resumed = sharded_model()
    resumed_opt = M.build(resumed, lr=0.02, weight_decay=0.1, adam_lr=3e-3)
    state = dict(zip(("model", "optimizer"), get_state_dict(resumed, resumed_opt)))
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for m, o in ((reference, reference_opt), (model, optimizer), (resumed, resumed_opt)):
        update(m, o)
    worst = max(((q.full_tensor() - p.detach()).norm() / p.detach().norm()).item()
                for p, q in zip(reference.parameters(), model.parameters()))
    resume_equal = all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), resumed.parameters()))
    return dict(routed=routed, worst=worst, resume_equal=resume_equal,
                local_bytes=apollo.optimizer_state_bytes(optimizer), whole_bytes=apollo.optimizer_state_bytes(reference_opt))


def _worker(rank, world_size, directory):
    from torch.distributed.tensor import init_device_mesh

    torch.set_num_threads(1)  # two processes on the CPU cores: no oversubscription (bf16 matmuls spin badly)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {name: _tensor_case(mesh, options) for name, options in CONFIGS.items()}
    out["fsdp"] = _fsdp_case(mesh, directory)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("muon_sharded")
    results = run_on_ranks(_worker, str(folder / "dcp"), world_size=WORLD, tmp_path=folder)
    assert sorted(results) == [0, 1]
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_update_equals_the_whole_matrix_update(results, name):
    for rank in range(WORLD):
        case = results[rank][name]
        assert case["equal"] and case["worst"] < 1e-5, (rank, case["worst"])  # bit-identical, in fact
        assert case["buffers_equal"]


def test_momentum_buffers_stay_sharded_by_rows(results):
    """Each rank holds its rows of every buffer (15 rows: 8 + 7) and of AdamW's moments."""
    rows = {0: lambda m: (m + 1) // 2, 1: lambda m: m - (m + 1) // 2}
    for rank in range(WORLD):
        case = results[rank]["nesterov"]
        assert case["layout"] == [(True, (rows[rank](m), n)) for m, n in MUON_SHAPES]
        muon = 4 * sum(rows[rank](m) * n for m, n in MUON_SHAPES)
        adamw = 4 * 2 * (rows[rank](7) + rows[rank](9) * 4) + 4 * len(ADAMW_SHAPES)  # + the 0-d float32 step
        assert case["local_bytes"] == muon + adamw, (rank, case["local_bytes"])
        assert case["whole_bytes"] == 4 * sum(m * n for m, n in MUON_SHAPES) + 4 * 2 * (7 + 36) + 8


def test_fsdp2_llama_matches_the_unsharded_run_and_resumes_exactly(results):
    for rank in range(WORLD):
        case = results[rank]["fsdp"]
        assert case["routed"] == [14, 7]  # 7 matrices x 2 layers to Muon; embeddings, head, 5 norms to AdamW
        assert case["worst"] < 1e-5, (rank, case["worst"])
        assert case["resume_equal"]
        assert case["local_bytes"] < 0.6 * case["whole_bytes"], case
