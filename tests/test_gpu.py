"""Tests that need CUDA (marked gpu; skipped without it). benchmarks/gpu_check.py runs them before it measures."""
import pytest
import torch

import apollo
from tests.conftest import make_tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(device, dtype):
    return make_tiny_llama(0).to(device=device, dtype=dtype)


@pytest.mark.parametrize("name", [name for name in apollo.optimizer_names() if "fused" in apollo.get_spec(name).options])
def test_fused_step_on_cuda_matches_the_plain_step(name):
    """float32 on the GPU: the fused and plain paths (the specs that take ``fused``) agree to float32 round-off
    (as on the CPU, tests/apollo/test_fused.py); rank 8 where the spec's smoke settings choose the rank."""
    results = []
    for fused in (True, False):
        model = _model("cuda", torch.float32)
        options = {"rank": 8} if "rank" in apollo.get_spec(name).smoke_options else {}
        optimizer = apollo.build_optimizer(name, model, lr=1e-3, fused=fused, **options)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).cuda()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(b.norm())), name


def test_every_optimizer_steps_in_bfloat16_on_cuda():
    for name in apollo.optimizer_names():
        for module in apollo.get_spec(name).requires:
            pytest.importorskip(module)
        model = _model("cuda", torch.bfloat16)
        optimizer = apollo.build_optimizer(name, model, lr=1e-3)
        batch = torch.randint(0, 128, (2, 16), device="cuda")
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
