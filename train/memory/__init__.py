r"""Memory of one LLaMA pretraining step: estimated without allocating anything, or measured on the CPU.

    python -m train.memory --model_config configs/llama_7b.json --optimizer apollo_mini --rank 1 \
        --batch_size 1 --max_length 256 --weight_quant --layerwise        # add --measure to run it for real
    python -m train.memory --model_config configs/llama_7b.json --gpu_memory 80GiB --max_batch   # the planner

The model is built on the meta device (shapes only) exactly as the training loop builds it, quantised
with `apollo.quant.quantize_model` when asked, and the real optimizer (any name of
`apollo.optimizer_names()`) takes one step on it, so the optimizer-state count comes from the
optimizer's own state tensors and cannot drift from the code. In bytes, with p the bytes per element
of the model dtype, s of the optimizer state, n a parameter's size (m x n for a matrix, k = min(m, n)),
N = B x T tokens, and h, I, L, V, nh, kv, hd the LLaMA sizes (hidden, intermediate, layers, vocab,
heads, key/value heads, head dim):

Where each part lives (each module's docstring has its rows of the model, with the math):
    meta.py         the model and its optimizer on the meta device; units (GB, DTYPE_BYTES)
    terms.py        the activations (weights, states, gradients are read off the meta model)
    scratch.py      the update's temporaries per optimizer: `SCRATCH`, name -> scratch model
    fsdp.py         data parallelism: DDP's buckets, FSDP2's per-rank shards and unsharded layers
    estimator.py    `prepare` (batch-independent) + `combine` (activations, the phases' peak) = `estimate`
    planner.py      `plan`: the largest micro-batch per optimizer and memory mode that fits a card
    measurement.py  `measure`, `measure_distributed`: the peak of real steps on this CPU
    cli.py          the command line (`__main__.py` runs it)
Every name these modules define is importable from `train.memory` itself (as when it was one module).
Validated against measured CPU peaks (--measure; docs/memory.md), DDP and FSDP2 under 2 gloo processes.
"""
# the private names too (noqa): tests and callers reached them as train.memory._x when this was one module
from train.memory.cli import _option, _print_estimate, build_parser, main  # noqa: F401
from train.memory.estimator import PHASES, Estimate, _Param, _Static, combine, estimate, prepare  # noqa: F401
from train.memory.fsdp import (_fsdp_units, ddp_bucket_bytes, fsdp_phases, fsdp_terms,  # noqa: F401
                               shard_numel, shard_rows, sharded_state_bytes)
from train.memory.measurement import (_allocation_peak, _allocation_trace, _batch,  # noqa: F401
                                      _distributed_worker, _local, live_bytes, measure, measure_distributed)
from train.memory.meta import (DTYPE_BYTES, GB, GIB, LOW_RANK, _bytes, _grad_bytes, build,  # noqa: F401
                               build_options, optimizer_for, resolve_state_dtype, step_on_meta)
from train.memory.planner import PLANNER_MODES, PlanRow, format_plan, largest_batch, parse_bytes, plan, planner_statics
from train.memory.scratch import (SCRATCH, ScratchModel, _adam_mini_scratch, _adamw8bit_scratch,  # noqa: F401
                                  _adamw_scratch, _fira_scratch, _fused_low_rank_scratch, _low_rank_family_scratch,
                                  _mixed, _muon_scratch, _scale_scratch, _soap_scratch, _state_bytes,
                                  fused_step_scratch, step_scratch, update_scratch)
from train.memory.terms import Activations, activations

__all__ = ["Activations", "DTYPE_BYTES", "Estimate", "GB", "GIB", "LOW_RANK", "PHASES", "PLANNER_MODES", "PlanRow",
           "SCRATCH", "ScratchModel", "activations", "build", "build_options", "build_parser", "combine",
           "ddp_bucket_bytes", "estimate", "format_plan", "fsdp_phases", "fsdp_terms", "fused_step_scratch",
           "largest_batch", "live_bytes", "main", "measure", "measure_distributed", "optimizer_for", "parse_bytes",
           "plan", "planner_statics", "prepare", "resolve_state_dtype", "shard_numel", "shard_rows",
           "sharded_state_bytes", "step_on_meta", "step_scratch", "update_scratch"]
