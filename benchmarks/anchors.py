"""Other libraries' optimizers as anchor rows of benchmarks/optimizer_step.py (benchmark-only installs).

They are never requirements of the project. Install them beside the benchmark, not into the environment:

    pip install --no-deps --target benchmarks/.anchors heavyball torchao pytorch-optimizer opt-einsum

`benchmarks/.anchors` is put on the path (after everything else) when it exists. Each anchor is a
factory of a zero-argument step; `build_anchors` returns the ones that build and take a first step
on this torch, and a one-line reason for each that does not (printed in its row).
Where a library is not the reference algorithm the row says so (NOTES).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

import apollo

ANCHOR_DIR = Path(__file__).resolve().parent / ".anchors"
if ANCHOR_DIR.is_dir() and str(ANCHOR_DIR) not in sys.path:
    sys.path.append(str(ANCHOR_DIR))

NOTES = {
    "heavyball adamw (compiled)": "heavyball.AdamW, its step torch.compile'd (compile_step); betas 0.9/0.999",
    "heavyball soap (compiled)": "heavyball.SOAP, compiled step; preconditioner every 10 steps",
    "heavyball muon (compiled)": "heavyball.Muon, compiled step",
    "torchao adamw8bit": "torchao.optim.AdamW8bit: block-wise 8-bit moments, step compiled through inductor",
    "torchao adamw4bit": "torchao.optim.AdamW4bit: block-wise 4-bit moments, step compiled through inductor",
    "pytorch-optimizer apollo": "not the reference APOLLO: scales the projected gradient and projects it back "
                                "(a rank-r update, scale applied as scale^1.5); rank as APOLLO's, channel scaling",
    "pytorch-optimizer apollo_mini": "not the reference APOLLO-Mini (rank-1 update projected back, scale^1.5); "
                                     "rank 1, tensor scaling, scale 128",
    "pytorch-optimizer galore": "pytorch_optimizer.GaLore (its own projector; SVD at refresh), scale 0.25",
}
ANCHORS = tuple(NOTES)
DEFAULT_ANCHORS = tuple(name for name in ANCHORS if "soap" not in name and "muon" not in name)  # minutes on a CPU


def _split_groups(model, **low_rank_keys) -> list[dict]:
    """The project's split (apollo.param_groups) in pytorch-optimizer's format: low-rank keys on the projected group."""
    regular, low_rank = apollo.param_groups(model)
    return [{"params": regular["params"]}, {"params": low_rank["params"], **low_rank_keys}]


def _factories(model, rank: int, gap: int) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    def heavyball(name: str, **kw):
        def make():
            import heavyball as hb
            optimizer = getattr(hb, name)(model.parameters(), lr=1e-3, **kw)
            optimizer.consume_grad = False  # heavyball frees .grad after its step; every row here steps on the same grads
            return optimizer
        return make

    def torchao(name: str):
        def make():
            from torchao import optim as ao
            return getattr(ao, name)(model.parameters(), lr=1e-3)
        return make

    def pytorch_optimizer(name: str, **keys):
        def make():
            import pytorch_optimizer as po
            return getattr(po, name)(_split_groups(model, update_proj_gap=gap, projection_type="std", **keys), lr=1e-3)
        return make

    return {
        "heavyball adamw (compiled)": heavyball("AdamW", betas=(0.9, 0.999)),
        "heavyball soap (compiled)": heavyball("SOAP", precondition_frequency=10),
        "heavyball muon (compiled)": heavyball("Muon"),
        "torchao adamw8bit": torchao("AdamW8bit"),
        "torchao adamw4bit": torchao("AdamW4bit"),
        "pytorch-optimizer apollo": pytorch_optimizer("APOLLO", rank=rank, scale=1.0, scale_type="channel"),
        "pytorch-optimizer apollo_mini": pytorch_optimizer("APOLLO", rank=1, scale=128.0, scale_type="tensor"),
        "pytorch-optimizer galore": pytorch_optimizer("GaLore", rank=rank, scale=0.25),
    }


def one_line(error: BaseException) -> str:
    """The error on one line; a missing library says how to install it."""
    if isinstance(error, ModuleNotFoundError):
        return f"{error.name} is not installed (pip install --no-deps --target benchmarks/.anchors ...; see benchmarks/anchors.py)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def build_anchors(model, names, rank: int, gap: int) -> tuple[dict[str, torch.optim.Optimizer], dict[str, str]]:
    """(name -> optimizer that took one step, name -> why it cannot run here). The first step is taken here
    (it compiles) and the weights are restored afterwards, so the timed steps start from the same values."""
    params = list(model.parameters())
    snapshot, grads = [p.detach().clone() for p in params], [p.grad for p in params]
    built, failed = {}, {}
    factories = _factories(model, rank, gap)
    for name in names:
        try:
            optimizer = factories[name]()
            optimizer.step()
            built[name] = optimizer
        except Exception as error:  # an anchor that does not run on this torch/CPU: say why in its row
            failed[name] = one_line(error)
        with torch.no_grad():
            for p, s, g in zip(params, snapshot, grads):
                p.copy_(s)
                p.grad = g
    return built, failed
