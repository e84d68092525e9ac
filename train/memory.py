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

weights        every parameter and buffer (int8 weights: 1 byte per element + 5 per group: s, z)
states         apollo.optimizer_state_bytes after one meta step
gradients      all gradients (p n each; an int8 weight's float_grad too); layer-wise: the largest one
activations    what autograd saves for backward (SDPA, fused attention kernel, no T^2 matrix):
                 per layer and token  2 (4 + 2p) h + 8      two RMSNorms: fp32 input, normalised x, output, rsqrt
                                    + p (2h + 2 kv hd) + 4 nh   q, k after RoPE, v, attention output; fp32 log-sum-exp
                                    + 4 p I                 gate, silu(gate), up, their product
                                    + p T                   SDPA's float copy of the padding mask (not with --packing)
                 outside the layers, per token  (4 + 2p) h + 4 + 4V + 16, + 2 T hd p once
                                    (final norm, fp32 log-softmax of the logits, ids/labels; RoPE cos/sin)
               + the loss's working set 8 V N (fp32 gradients of the log-softmax and its input)
               activation checkpointing keeps only each layer's input (p h per token) and recomputes
               one layer at a time: + one layer's set + its backward temporaries N (3 p I + 4 p h + 8 h)
               int8 weights: a layer's dequantised weight (float32, then cast: 4 n + p n [p != 4]) exists
               inside its own forward or backward
               (printed: saved + the largest of loss working set, recomputed layer, dequantised weight)
scratch        temporaries of the update, per optimizer family (`update_scratch`):
               APOLLO/GaLore fused path (float weights, apollo/fused.py): regular parameters none (torch's
               fused AdamW kernel, in place) unless the state dtype differs from the weights' (then the
               plain spec AdamW, n (s + p)); low-rank weights a chunk at a time: P (p |P|), R and the
               direction (s |R| each) of every weight of the chunk + one weight's transient (P drawn in
               float32, the SVD 4 (n + m k + k n) at a refresh, GaLore's back-projection p n). int8
               weights take the plain path: APOLLO 2 p n (bf16: 6 n), GaLore/SVD as above, + their
               float32 copy 4 n, re-quantised in place (+ n for q, + 4 n of noise when stochastic).
               torch AdamW 2 p n on the CPU, on CUDA p N_all (its foreach path takes sqrt(v) of every
               parameter at once).
               Fira: the SVD at a refresh as GaLore, else R (p |R|), Adam's direction (s |R|), the
               residual G - alpha B(R) (p n) and B(direction) (p n); on the CPU a half-precision
               product is formed in float32 (4 (n + |P| + |R|)).
               SCALE: none for a matrix (the update is one in-place addcmul), but a half-precision
               gradient's norms read a float32 copy (4 n); lm_head's momentum as a matrix, the norms'
               AdamW s n (sqrt v) + s n when casting.
               Muon (torch.optim.Muon): Nesterov's U (p n), then Newton-Schulz in bfloat16 on the
               matrix transposed to k x max(m, n): X (2 n) and at its worst the next X beside A, B
               (k x k each): max(2 n + 6 k^2, 4 n + 4 k^2); the AdamW part as torch AdamW.
               Adam-mini: a block's mean square is a norm (a half-precision gradient read in float32:
               4 n), the denominator per block (2 s n only for elementwise blocks).
               SOAP (per m x n, w = 4 the compute bytes): the state in float32 when kept in bf16
               (w (2 m n + 2 m^2 + 2 n^2)) and G (w m n); the direction Q_L (M/(sqrt V + eps)) Q_R^T
               ((1 + sides) w m n) or, at a basis refresh, m in the weight basis + the power step and QR
               (both sides: 1.8 w m n + 4 w k^2 + the other new basis; one: w m n + 5 w k^2, measured)
               or m rotated into the new basis ((1 + sides) w m n); the statistics G G^T (w m^2).
               8-bit AdamW (bitsandbytes): in place on CUDA; the CPU kernel works in float32 blocks.
DDP buckets    with several processes: DDP's flat all-reduce buckets, one copy of every float gradient that
               requires grad, alive for the whole run. The harness's DDP (`train.distributed.BucketViewDDP`)
               keeps those gradients in the buckets (their .grad are views), so they are not counted
               again: each gradient computed in backward exists on its own only until it is added into
               its bucket (the largest such transient is counted). torch's plain DDP (`ddp_bucket_view=
               False`) keeps a second copy in .grad.
FSDP2          (`fsdp=True`, per process): every parameter, its gradient and every optimizer state whose first
               dimension is the parameter's rows is divided by rows as FSDP2 divides them (Shard(0):
               ceil(rows / world) rows on every rank, the padding included); other states (low-rank
               moments r x n, projections, scalars) are whole on every rank. Unsharded while in use: the
               root module (embeddings, final norm, lm_head; all-gathered for forward and kept through
               backward), a decoder layer and the next one prefetched (each its all-gather buffer and its
               copied-out parameters at the start of backward), the layer's unsharded
               gradients and their reduce-scatter input; at the end (the root resharded) the root's
               gradients and their reduce-scatter input. Accumulating, the loop reduce-scatters every
               micro-step (train/loop.py), so the earlier micro-steps' gradients are held as this rank's
               shards, and every backward is a synchronising one. CPU check (2 gloo ranks): within 5%,
               states exactly.
               Update scratch is that of the whole matrices (an upper bound for row-local updates).
total (peak)   weights + states (+ DDP buckets) + the largest of these phases of a step:
                 backward start       activations (+ every gradient, or its shard under FSDP2, when accumulating)
                 lm_head gradient     saved - 4 V N (log-softmax freed) + recompute + lm_head's gradient
                                      (layer-wise: + the largest gradient + scratch of a non-embedding weight)
                 end of backward      outside-layer activations - 4 V N + recompute + all gradients
                                      (+ the embedding's gradient, in flight, when it is added into an
                                      existing buffer; layer-wise: the embedding's gradient + scratch)
                 optimizer step       all gradients + scratch (normal mode)
               Activations are freed as gradients appear, so the peak sits at one of these ends.
               `Estimate.breakdown` holds the terms of the peak phase: they add up to the total.
Validated against measured CPU peaks (--measure; docs/memory.md), DDP and FSDP2 under 2 gloo processes.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

import apollo
from apollo.fused import step_chunks
from apollo.layerwise import LayerwiseOptimizer
from apollo.projection import projected_shape, projection_shape, projection_side
from apollo.quant import QuantLinear, is_quantized, quantize_model
from train.optimizer_flags import MODES, PARAM_DTYPE_STATES

GB = 1e9  # decimal gigabytes; a "12 GB" claim is checked against 12e9 bytes (GiB would be more lenient)
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
PHASES = ("backward start", "lm_head gradient", "end of backward", "optimizer step")
LOW_RANK = ("apollo", "apollo_mini", "apollo_svd", "galore", "fira")


@dataclass
class Estimate:
    """Bytes per term. `gradients`, `activations`, `update_scratch` are each term's largest value in a step;
    `total` is the modelled peak, and `breakdown` the terms alive at that peak (they sum to `total`)."""

    parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    update_scratch: int
    total: int
    notes: dict[str, str] = field(default_factory=dict)
    ddp_buckets: int = 0  # DistributedDataParallel's flat gradient buckets (several processes only)
    peak_phase: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # every phase's total

    def terms(self) -> dict[str, int]:
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer states": self.optimizer_states,
                 "activations": self.activations, "update scratch": self.update_scratch}
        if self.ddp_buckets:
            terms["DDP buckets"] = self.ddp_buckets
        return {**terms, "total (peak)": self.total}

    def peak_line(self) -> str:
        """'weights 1.23 + ... = 4.56 GB (peak: end of backward)': the terms that add up to the total."""
        parts = " + ".join(f"{name} {value / GB:.2f}" for name, value in self.breakdown.items())
        return f"{parts} = {self.total / GB:.2f} GB (peak: {self.peak_phase})"


# ----------------------------------------------------------------------------------- the model


def build(config, *, dtype: str, device: str, weight_quant: bool, weight_group_size: int, weight_bits: int = 8,
          stochastic_round: bool = False, activation_checkpointing: bool = False) -> nn.Module:
    """The model as train/loop.py builds it (meta device: shapes only), int8-quantised on request."""
    from train.model import build_model

    model = build_model(config, dtype=dtype, device=device, activation_checkpointing=activation_checkpointing)
    if weight_quant:
        quantize_model(model, group_size=weight_group_size, bits=weight_bits, stochastic_round=stochastic_round)
    return model


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_bytes(param: torch.Tensor, p: int) -> int:
    return param.numel() * p if is_quantized(param) else _bytes(param)


def resolve_state_dtype(name: str, state_dtype: str | None) -> str:
    """"param" or "float32": None picks the harness default (float32, except for the optimizers whose
    states always follow the weights: `train.optimizer_flags.PARAM_DTYPE_STATES`)."""
    if name in PARAM_DTYPE_STATES:
        return "param"
    return "float32" if state_dtype is None else state_dtype


def build_options(name: str, *, rank: int | None = None, state_dtype: str | None = None,
                  options: dict | None = None) -> dict:
    """The `apollo.build_optimizer` options for `name`: only those it takes (`REGISTRY[name].options`)."""
    accepted = apollo.registry.REGISTRY[name].options
    chosen = {key: value for key, value in (options or {}).items() if key != "state_dtype" and value is not None}
    unknown = sorted(set(chosen) - accepted)
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take option(s) {', '.join(unknown)}")
    if rank is not None:
        if "rank" not in accepted:
            raise ValueError(f"--rank does not apply to --optimizer {name} (it is used by {', '.join(LOW_RANK)})")
        chosen["rank"] = rank
    if "state_dtype" in accepted and name not in PARAM_DTYPE_STATES and state_dtype == "float32":
        chosen["state_dtype"] = "float32"
    return chosen


def optimizer_for(model: nn.Module, name: str, *, rank: int | None = None, state_dtype: str | None = None,
                  layerwise: bool = False, lr: float = 1e-3, options: dict | None = None):
    """The optimizer train/loop.py would build (state_dtype "param" means: follow the weights)."""
    name = apollo.canonical_name(name)
    kwargs = build_options(name, rank=rank, state_dtype=state_dtype, options=options)
    if layerwise:
        return LayerwiseOptimizer(model, name, lr=lr, **kwargs)
    return apollo.build_optimizer(name, model, lr=lr, **kwargs)


def step_on_meta(model: nn.Module, name: str, *, rank: int | None, state_dtype: str | None, p_dtype,
                 options: dict | None = None):
    """Run the real optimizer's first step on the meta device; returns the optimizer, its state created.

    8-bit AdamW needs bitsandbytes (its meta kernels create the real state shapes): ValueError without it.
    """
    try:
        optimizer = optimizer_for(model, name, rank=rank, state_dtype=state_dtype, options=options)
    except ImportError as error:
        raise ValueError(f"--optimizer {name}: {error}") from None
    for param in model.parameters():
        if is_quantized(param):
            param.float_grad = torch.empty(param.shape, dtype=p_dtype, device=param.device)
        elif param.requires_grad:
            param.grad = torch.empty_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# ----------------------------------------------------------------------------------- the terms


@dataclass
class Activations:
    """Activation memory of a step, in bytes (module docstring)."""

    saved: int  # saved for backward at the end of the forward pass
    loss_work: int  # the loss's working set at the start of backward (fp32 gradients, 8 V N)
    log_softmax: int  # the saved fp32 log-softmax (4 V N), freed before the lm_head gradient exists
    outside: int  # the part of `saved` outside the decoder layers
    recompute: int  # activation checkpointing: one layer recomputed + its backward temporaries


def activations(config, batch_size: int, seq_len: int, p: int, *, checkpointing: bool = False,
                padded: bool = True) -> Activations:
    """Saved activations and the loss's working set, by the per-layer formula of the module docstring."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    tokens = batch_size * seq_len
    layer = 2 * (4 + 2 * p) * h + 8 + p * (2 * h + 2 * kv * hd) + 4 * heads + 4 * p * inter + (p * seq_len if padded else 0)
    outside = tokens * ((4 + 2 * p) * h + 4 + 4 * vocab + 16) + 2 * seq_len * hd * p  # RoPE cos/sin: one (T, hd) each
    if checkpointing:
        saved, recompute = tokens * layers * p * h + outside, tokens * (layer + 3 * p * inter + 4 * p * h + 8 * h)
    else:
        saved, recompute = tokens * layers * layer + outside, 0
    return Activations(saved, 8 * vocab * tokens, 4 * vocab * tokens, outside, recompute)


def update_scratch(param: torch.Tensor, group: dict | None, *, name: str, p: int, device: str,
                   stochastic_round: bool) -> int:
    """Temporaries of one parameter's update (module docstring); `group` is its param group."""
    n = param.numel()
    if name == "adamw":  # torch.optim.AdamW, per parameter (the joint CUDA case is handled by the caller)
        return (1 if device == "cuda" else 2) * p * n
    quantized = is_quantized(param)
    if name in ("apollo", "apollo_mini", "apollo_svd", "galore"):
        scratch = _low_rank_family_scratch(param, group, name=name, p=p, device=device)
    elif name == "fira":
        scratch = _fira_scratch(param, group, p=p, device=device)
    elif name == "scale":
        scratch = _scale_scratch(param, group, p=p)
    elif name == "muon":
        scratch = _muon_scratch(param, group, p=p, device=device)
    elif name == "adam_mini":
        scratch = _adam_mini_scratch(param, group, p=p)
    elif name == "soap":
        scratch = _soap_scratch(param, group, p=p)
    elif name == "adamw8bit":
        scratch = _adamw8bit_scratch(param, group, p=p, device=device)
    else:  # an optimizer registered later: no model of its update yet
        scratch = 0
    if quantized:  # the float32 copy, and dequantising / re-quantising it (a float32 temporary, q, noise)
        scratch = 4 * n + max(scratch, 4 * n, n * (1 + (4 if stochastic_round else 0)))
    return scratch


def _mixed(n: int, out: int, operand: int) -> int:
    """An in-place elementwise op into a tensor of `out` bytes per element from operands of another dtype:
    on the CPU torch forms the result in float32 and reads a float32 copy (measured: 8 n; 4 n for add_)."""
    return 8 * n if out != operand else 0


def _state_bytes(group: dict, p: int) -> int:
    return 4 if group.get("state_dtype") in ("float32", torch.float32) else p


def _low_rank_family_scratch(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    s = _state_bytes(group, p)
    quantized = is_quantized(param)
    if group.get("rank") is None:
        return 0 if s == p and not quantized else n * (s + (p if s != p else 0))
    if not quantized:
        proj_held, proj_transient, held, held_without_r, update = _fused_low_rank_scratch(
            param, group, name=name, p=p, device=device)
        return max(proj_held + proj_transient, held, held_without_r + update)
    m, k = param.shape[0], min(param.shape)
    svd = 4 * (n + m * k + k * param.shape[1]) + (4 * n if p != 4 else 0)
    apollo_update = max(2 * p * n, p * n + (4 * n if p != 4 else 0))
    if name == "galore":
        return max(p * n, svd)
    return max(apollo_update, svd if group.get("proj") == "svd" else 0)


def _fira_scratch(param: torch.Tensor, group: dict, *, p: int, device: str) -> int:
    n = param.numel()
    s = _state_bytes(group, p)
    if group.get("rank") is None:
        return 0 if s == p and not is_quantized(param) else n * (s + (p if s != p else 0))
    (m, cols), k = param.shape, min(param.shape)
    side = projection_side(param.shape, group.get("proj_type", "std"))
    r_size = math.prod(projected_shape(param.shape, group["rank"], side))
    p_size = math.prod(projection_shape(param.shape, group["rank"], side))
    svd = 4 * (n + m * k + k * cols) + (4 * n if p != 4 else 0)
    # B(X) = P X (or X Q) in the gradient's dtype; on the CPU a half-precision product is formed in float32:
    # float32 operands and result, then the cast
    back = 4 * (p_size + r_size) + 4 * n + p * n if device == "cpu" and p == 2 else p * n
    project = 4 * (n + p_size + r_size) + p * r_size if device == "cpu" and p == 2 else p * r_size
    return max(svd, project,
               p * r_size + s * r_size + back,  # R and its direction while the residual G - alpha B(R) is made
               s * r_size + p * n + back)  # the direction and the residual while B(direction) is made


def _scale_scratch(param: torch.Tensor, group: dict, *, p: int) -> int:
    n = param.numel()
    s = _state_bytes(group, p)
    rule = group.get("rule")
    upcast = 4 * n if p != 4 else 0  # vector_norm(dtype=float32) of a half-precision matrix reads a float32 copy
    if rule == "column_norm":  # the factor is cast to the gradient's dtype: addcmul_ without a temporary
        return upcast
    if rule == "momentum_column_norm":  # the cast gradient, the norm of M, W.addcmul_(M, factor) across dtypes
        return max(s * n if s != p else 0, 4 * n if s != 4 else 0, _mixed(n, p, s))
    return max((s * n if s != p else 0) + s * n, _mixed(n, p, s))  # adamw: the cast gradient, sqrt(v)


def _muon_scratch(param: torch.Tensor, group: dict, *, p: int, device: str) -> int:
    n = param.numel()
    if group.get("kind") != "muon":  # torch AdamW (per tensor on the CPU; the CUDA foreach case: the caller)
        return (1 if device == "cuda" else 2) * p * n
    k = min(param.shape)
    nesterov = p * n if group.get("nesterov", True) else 0
    newton_schulz = max(2 * 2 * n + 2 * 2 * k * k, 2 * n + 3 * 2 * k * k)  # bfloat16 X, X', A = X X^T, B
    return nesterov + newton_schulz


def _adam_mini_scratch(param: torch.Tensor, group: dict, *, p: int) -> int:
    n = param.numel()
    s = _state_bytes(group, p)
    mixed = max(_mixed(n, p, s), 4 * n if s != p else 0)  # m += g across dtypes; W.addcdiv_(m, denom) across dtypes
    if group.get("block") == "elementwise":
        return max(2 * s * n, mixed)
    return max(4 * n if s != p else 0, mixed)  # the block norms of a half-precision gradient read a float32 copy


def _soap_scratch(param: torch.Tensor, group: dict, *, p: int) -> int:
    n = param.numel()
    s = _state_bytes(group, p)
    w = max(s, 4)  # eigh/QR have no half-precision kernels: the work dtype is at least float32
    if param.dim() != 2:
        return (s * n if s != p else 0) + s * n  # functional.adamw_update: the cast gradient, sqrt(v)
    m, cols = param.shape
    limit = group.get("max_precond_dim", 10000)
    sides = [size for size in (m, cols) if size <= limit]
    squares = sum(size * size for size in sides)
    held = (w * (2 * n + 2 * squares) if s != w else 0) + (w * n if p != w else 0)  # work copies of state and G
    # M / (sqrt(V) + eps), then one product per rotated side (the previous result alive)
    direction = (1 + max(len(sides), 1)) * w * n + (p * n if p != w else 0)
    statistics = w * max(sides, default=0) ** 2
    # a basis refresh: m in the weight basis (w m n) beside the power step L Q, its reordering, QR's Q and R
    # (4-5 w k^2 measured), the other side's new basis while the second is made; then m rotated back
    if len(sides) == 2:
        refresh = int(1.8 * w * n) + max(4 * w * sides[0] ** 2, 4 * w * sides[1] ** 2 + w * sides[0] ** 2)
    else:
        refresh = w * n + 5 * w * max(sides, default=0) ** 2
    return held + max(direction, statistics, refresh, (1 + len(sides)) * w * n)


def _adamw8bit_scratch(param: torch.Tensor, group: dict, *, p: int, device: str) -> int:
    n = param.numel()
    if device == "cuda":
        return 0  # bitsandbytes' CUDA kernel dequantises, updates and re-quantises in registers
    # the CPU kernel, measured: five float32 tensors of the parameter's size (+ the gradient read in float32)
    return 5 * 4 * n + (4 * n if p != 4 else 0)


def _fused_low_rank_scratch(param: torch.Tensor, group: dict, *, name: str, p: int,
                            device: str = "cuda") -> tuple[int, int, int, int, int]:
    """Bytes of one float weight in apollo's fused low-rank step (apollo/fused.py), by phase of its chunk:

    (P held, P transient) while the chunk's projections are made: a random P not stored (p |P|), drawn in
    float32 and cast (+ 4 |P|); an SVD P is state, its refresh takes 4 (n + m k + k n) (+ 4 n to cast);
    (held, held without R, transient) while the chunk is updated: P, R cast to the state dtype and the
    normalised direction (s |R| each); GaLore frees R before it back-projects one weight at a time
    (p n, + p |R| to cast the direction). On the CPU, half-precision matmuls run in float32
    (fused.matmul_operands): the projection adds 4 (n + |P| + |R|) (not at rank 1), GaLore's back-projection
    4 (|R| + |P| + n).
    """
    s = _state_bytes(group, p)
    side = projection_side(param.shape, group.get("proj_type", "std"))
    r_size = math.prod(projected_shape(param.shape, group["rank"], side))
    p_size = math.prod(projection_shape(param.shape, group["rank"], side))
    svd_kind = name == "galore" or group.get("proj") == "svd"
    n, (m, cols), k = param.numel(), param.shape, min(param.shape)
    proj_held = 0 if svd_kind or group.get("store_projection") else p * p_size
    proj_transient = (4 * (n + m * k + k * cols) + (4 * n if p != 4 else 0) if svd_kind
                      else (4 * p_size if p != 4 else 0))
    update_transient = p * n + (p * r_size if s != p else 0) if name == "galore" else 0
    if device == "cpu" and p == 2:
        if group["rank"] > 1:  # a rank-1 projection stays in half precision (fused.projection_operands)
            proj_transient = max(proj_transient, 4 * (n + p_size + r_size))
        update_transient += 4 * (r_size + p_size + n) if name == "galore" else 0
    return proj_held, proj_transient, proj_held + 2 * s * r_size, proj_held + s * r_size, update_transient


def fused_step_scratch(group: dict, *, name: str, p: int, device: str = "cuda") -> int:
    """The fused low-rank step's scratch for a param group: its largest chunk (`fused.step_chunks`: moment
    numbers, and on the CPU gradient numbers too), at the larger of its two phases (`_fused_low_rank_scratch`)."""
    params = [q for q in group["params"] if not is_quantized(q)]
    if not params:
        return 0
    terms = [_fused_low_rank_scratch(q, group, name=name, p=p, device=device) for q in params]
    sizes = [math.prod(projected_shape(q.shape, group["rank"], projection_side(q.shape, group.get("proj_type", "std"))))
             for q in params]
    return max(max(sum(t[0] for t in terms[a:b]) + max(t[1] for t in terms[a:b]),
                   sum(t[2] for t in terms[a:b]),
                   sum(t[3] for t in terms[a:b]) + max(t[4] for t in terms[a:b]))
               for a, b in step_chunks(sizes, [q.numel() for q in params], torch.device(device)))


# ------------------------------------------------------------------------------ sharding (FSDP2)


def shard_numel(shape, world_size: int) -> int:
    """Numbers per rank of a tensor split by rows as FSDP2's Shard(0) does: ceil(rows / world) rows (padded)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def shard_rows(rows: int, world_size: int, rank: int = 0) -> int:
    """Rows of a Shard(0) DTensor on `rank`: torch chunks by ceil(rows / world), the last ranks get the rest."""
    chunk = math.ceil(rows / world_size)
    return max(0, min(chunk, rows - rank * chunk))


def sharded_state_bytes(optimizer: torch.optim.Optimizer, world_size: int, rank: int = 0) -> int:
    """`apollo.optimizer_state_bytes` of FSDP2 rank `rank` (0 holds the most), from the unsharded meta step's
    state: a state whose first dimension is its parameter's rows is split by rows (a Shard(0) DTensor: the
    moments, Muon's and SCALE's momentum, Adam-mini's per-row v); the rest (low-rank moments r x n, a stored
    projection, scalars such as step, limiter norms, per-head v) is whole on every rank. Equal to the bytes
    of 2-process FSDP2 runs for every optimizer that shards (tests/train/test_memory_planner.py)."""
    total = 0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                rows_split = (value.dim() >= 1 and param.dim() >= 1 and value.shape[0] == param.shape[0]
                              and key != "projection")
                numel = shard_rows(value.shape[0], world_size, rank) * math.prod(value.shape[1:]) if rows_split \
                    else value.numel()
                total += numel * value.element_size()
            elif isinstance(value, (int, float)):
                total += 8
    return total


def _fsdp_units(model: nn.Module) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """(root parameters, each decoder layer's parameters), as `train.distributed.shard_model` groups them."""
    layers = [list(layer.parameters()) for layer in model.model.layers]
    inside = {id(q) for layer in layers for q in layer}
    return [q for q in model.parameters() if id(q) not in inside], layers


# ----------------------------------------------------------------------------------- estimating


@dataclass
class _Param:
    name: str
    grad: int  # gradient bytes (this rank's shard under FSDP2)
    scratch: int  # the update's temporaries
    in_buckets: bool  # its gradient lives in DDP's buckets (BucketViewDDP)


@dataclass
class _Static:
    """What does not depend on the micro-batch: built once per model, optimizer and mode (`prepare`)."""

    config: object
    name: str
    p: int  # bytes per weight element
    act_p: int  # bytes per activation element (the compute dtype)
    parameters: int
    weights: int
    states: int
    buckets: int
    params: list[_Param]
    scratch: int
    scratch_note: str
    dequantised: int
    head: int  # lm_head's gradient bytes
    embedding: int  # the input embedding's gradient bytes
    embedding_name: str
    tied: bool
    layerwise: bool
    accumulation: int
    fsdp: dict | None
    notes: dict[str, str]


def prepare(config, *, optimizer: str = "adamw", rank: int | None = None, weight_quant: bool = False,
            weight_group_size: int = 128, weight_bits: int = 8, stochastic_round: bool = False,
            layerwise: bool = False, dtype: str = "bfloat16", state_dtype: str | None = None, device: str = "cuda",
            world_size: int = 1, gradient_accumulation: int = 1, ddp_bucket_view: bool = True, fsdp: bool = False,
            fsdp_mixed_precision: bool = False, options: dict | None = None) -> _Static:
    """The batch-independent part of `estimate` (the model, the optimizer's meta step, every gradient and
    update's scratch); `combine(static, batch_size, max_length, ...)` adds the activations and the phases."""
    name = apollo.canonical_name(optimizer)
    state_dtype = resolve_state_dtype(name, state_dtype)
    if fsdp and world_size < 2:
        raise ValueError("fsdp shards over processes: world_size must be > 1")
    if fsdp and (weight_quant or layerwise):
        raise ValueError(f"--fsdp does not combine with --{'weight_quant' if weight_quant else 'layerwise'}")
    if layerwise and (world_size > 1 or gradient_accumulation > 1):
        raise ValueError("--layerwise runs on one process without gradient accumulation")
    for mode, on in (("weight_quant", weight_quant), ("layerwise", layerwise), ("fsdp", fsdp)):
        if on and name in MODES[mode]:
            raise ValueError(f"--{mode} does not work with --optimizer {name}: {MODES[mode][name]}")
    p = DTYPE_BYTES[dtype]
    model = build(config, dtype=dtype, device="meta", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  weight_bits=weight_bits)
    config = model.config
    p_dtype = next(p_ for p_ in model.parameters() if p_.is_floating_point()).dtype

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(_bytes(t) for t in tensors.values())
    optimizer_on_meta = step_on_meta(model, name, rank=rank, state_dtype=state_dtype, p_dtype=p_dtype, options=options)
    states = (sharded_state_bytes(optimizer_on_meta, world_size) if fsdp
              else apollo.optimizer_state_bytes(optimizer_on_meta))
    groups = {id(param): group for group in optimizer_on_meta.param_groups for param in group["params"]}
    names = {id(param): param_name for param_name, param in model.named_parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad or is_quantized(q)]
    viewed = world_size > 1 and not fsdp and ddp_bucket_view
    per_param = [_Param(names[id(q)], _grad_bytes(q, p) if not fsdp else shard_numel(q.shape, world_size) * q.element_size(),
                        update_scratch(q, groups.get(id(q)), name=name, p=p, device=device, stochastic_round=stochastic_round),
                        viewed and q.requires_grad and q.is_floating_point())
                 for q in trainable]
    dequantised = max(((4 + (p if p != 4 else 0)) * q.numel() for q in trainable if is_quantized(q)), default=0)
    notes = {"state dtype": dtype if state_dtype == "param" else state_dtype}

    # the update's scratch (normal mode): the largest parameter's, a fused chunk's, or torch AdamW's foreach
    if layerwise:
        scratch, scratch_note = 0, ""
    else:
        foreach_adamw = [q for q in trainable if name == "adamw" or (name == "muon" and groups[id(q)].get("kind") != "muon")]
        worst = max(per_param, key=lambda item: item.scratch)
        scratch, scratch_note = worst.scratch, f"temporaries of {worst.name}'s update"
        if device == "cuda" and foreach_adamw:
            joint = sum(_grad_bytes(q, p) for q in foreach_adamw)  # the foreach path takes sqrt(v) of all at once
            if joint >= scratch:
                scratch, scratch_note = joint, "torch AdamW (foreach): sqrt of every second moment at once"
        if name in ("apollo", "apollo_mini", "apollo_svd", "galore"):
            chunked = max((fused_step_scratch(g, name=name, p=p, device=device)
                           for g in optimizer_on_meta.param_groups if g.get("rank") is not None), default=0)
            if chunked > scratch:
                scratch, scratch_note = chunked, "the fused low-rank step's largest chunk (P, R, direction)"

    fsdp_info = None
    if fsdp:
        c = 2 if fsdp_mixed_precision else p  # FSDP2 all-gathers (and computes gradients) in the compute dtype
        r = 4 if fsdp_mixed_precision else p  # and reduce-scatters them in the reduce dtype
        root, layers = _fsdp_units(model)
        root_numel = sum(q.numel() for q in root)
        layer_numel = max((sum(q.numel() for q in layer) for layer in layers), default=0)
        sharded = sum(shard_numel(q.shape, world_size) * q.element_size() for q in model.parameters())
        weights = sharded + sum(_bytes(b) for b in model.buffers())
        fsdp_info = {"world_size": world_size, "root": c * root_numel, "root_grad": (c + r) * root_numel,
                     "layer": c * layer_numel, "layer_grad": (c + r) * layer_numel,
                     "head": c * model.get_output_embeddings().weight.numel()}
        notes["weights"] = f"this rank's shards (1/{world_size} of the rows of every tensor)"
        notes["optimizer states"] = "this rank's shards of the row-split states; low-rank moments, projections whole"
    buckets = sum(q.numel() * q.element_size() for q in trainable if q.requires_grad and q.is_floating_point()) \
        if world_size > 1 and not fsdp else 0
    if weight_quant:
        quantized = [q for q in trainable if is_quantized(q)]
        int8 = sum(q.numel() for q in quantized)
        extra = sum(_bytes(m.weight_scales) + _bytes(m.weight_zeros) + _bytes(m.rounding_state)
                    for m in model.modules() if isinstance(m, QuantLinear))
        notes["weights"] = f"int8 {int8 / GB:.2f} + scales/zeros {extra / GB:.2f} + {dtype} {(weights - int8 - extra) / GB:.2f}"
    head_param, embedding_param = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    grads = {item.name: item.grad for item in per_param}
    return _Static(config=config, name=name, p=p, act_p=2 if fsdp_mixed_precision else p,
                   parameters=sum(q.numel() for q in model.parameters()), weights=weights, states=states,
                   buckets=buckets, params=per_param, scratch=scratch, scratch_note=scratch_note,
                   dequantised=dequantised, head=grads.get(names[id(head_param)], 0),
                   embedding=grads.get(names[id(embedding_param)], 0), embedding_name=names[id(embedding_param)],
                   tied=head_param is embedding_param, layerwise=layerwise, accumulation=gradient_accumulation,
                   fsdp=fsdp_info, notes=notes)


def combine(static: _Static, batch_size: int, max_length: int, *, activation_checkpointing: bool = False,
            packing: bool = False) -> Estimate:
    """`estimate` from its batch-independent part: activations, then the peak over the phases of a step."""
    acts = activations(static.config, batch_size, max_length, static.act_p, checkpointing=activation_checkpointing,
                       padded=not packing)
    dequantised = static.dequantised
    notes = dict(static.notes)
    activation_peak = acts.saved + max(acts.loss_work, acts.recompute, dequantised)
    after_head = acts.saved - acts.log_softmax + acts.recompute
    remaining = acts.outside - acts.log_softmax  # what is still saved when the last layer's gradients appear
    notes["activations"] = (f"saved {acts.saved / GB:.3f} + the largest of: loss {acts.loss_work / GB:.3f}"
                            + (f", recomputed layer {acts.recompute / GB:.3f}" if activation_checkpointing else "")
                            + (f", dequantised weight {dequantised / GB:.3f}" if dequantised else ""))
    params = static.params
    # each phase: {term: bytes} of what is alive besides weights, states and buckets
    if static.layerwise:  # one gradient (and its update's scratch) at a time; the embedding's comes last
        others = [item for item in params if item.name != static.embedding_name] or params
        during = max(others, key=lambda item: item.grad + item.scratch)
        last = next((item for item in params if item.name == static.embedding_name), during)
        worst = max(params, key=lambda item: item.grad + item.scratch)
        gradients, scratch = worst.grad, worst.scratch
        notes["gradients"] = f"largest single gradient ({worst.name}), freed at once"
        notes["update scratch"] = f"temporaries of {worst.name}'s update"
        phases = {"backward start": {"activations": activation_peak},
                  "lm_head gradient": {"activations": after_head, "gradients": during.grad,
                                       "update scratch": during.scratch},
                  "end of backward": {"activations": remaining, "gradients": last.grad, "update scratch": last.scratch}}
    else:
        own = sum(item.grad for item in params if not item.in_buckets)  # gradients held by the parameters
        gradients = sum(item.grad for item in params)
        accumulating = static.accumulation > 1
        held = own if accumulating else 0  # micro-steps >= 2 start with every gradient of the earlier ones
        # the embedding's gradient is computed last; it is a transient when it is added into an existing buffer
        in_flight = static.embedding if (accumulating or static.tied or static.buckets and any(
            item.in_buckets for item in params)) else 0
        scratch = static.scratch
        notes["update scratch"] = static.scratch_note
        notes["gradients"] = "every parameter's gradient" + (" (in DDP's buckets)" if own < gradients else "")
        phases = {"backward start": {"activations": activation_peak, "gradients": held},
                  "lm_head gradient": {"activations": after_head, "gradients": held + static.head},
                  "end of backward": {"activations": remaining + acts.recompute, "gradients": own + in_flight},
                  "optimizer step": {"gradients": own, "update scratch": scratch}}
        if static.fsdp:
            f = static.fsdp
            # accumulating, every micro-step reduce-scatters (train/loop.py): `held` is this rank's gradient
            # shards, and each backward is the synchronising one below.
            # The layer being all-gathered and the prefetched one, each its all-gather buffer and its copy-out.
            # Counts calibrated on 2-process CPU runs (docs/memory.md), not traced
            phases["backward start"]["unsharded parameters"] = f["root"] + 4 * f["layer"]
            # a layer's unsharded gradients and their reduce-scatter input
            phases["lm_head gradient"] = {"activations": after_head, "gradients": held,
                                          "unsharded parameters": f["root"] + 2 * f["layer"],
                                          "unsharded gradients": f["head"] + f["layer_grad"]}
            # the root reshards before its reduce-scatter: its unsharded gradients and the reduce-scatter input
            phases["end of backward"]["unsharded gradients"] = f["root_grad"]
            phases["end of backward"]["gradients"] = own
            notes["gradients"] = f"this rank's shards of every gradient (1/{f['world_size']})"
    totals = {phase: sum(parts.values()) for phase, parts in phases.items()}
    peak_phase = max(totals, key=lambda phase: totals[phase])
    resident = {"weights": static.weights, "optimizer states": static.states}
    if static.buckets:
        resident["DDP buckets"] = static.buckets
    breakdown = {**resident, **{term: value for term, value in phases[peak_phase].items() if value}}
    total = sum(breakdown.values())
    base = sum(resident.values())
    return Estimate(static.parameters, static.weights, gradients, static.states, activation_peak, scratch, total, notes,
                    static.buckets, peak_phase, breakdown, {phase: base + value for phase, value in totals.items()})


def estimate(config, *, optimizer: str = "adamw", batch_size: int = 1, max_length: int = 256, rank: int | None = None,
             weight_quant: bool = False, weight_group_size: int = 128, weight_bits: int = 8, stochastic_round: bool = False,
             layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "bfloat16",
             state_dtype: str | None = None, packing: bool = False, device: str = "cuda", world_size: int = 1,
             gradient_accumulation: int = 1, ddp_bucket_view: bool = True, fsdp: bool = False,
             fsdp_mixed_precision: bool = False, options: dict | None = None) -> Estimate:
    """Estimate the memory of a training step per process (module docstring); nothing is allocated.

    `config`: a LlamaConfig or a path to its json. `optimizer`: any registered name. `state_dtype`:
    "float32" or "param"; None picks the harness default (float32, except for torch AdamW, Muon and 8-bit
    AdamW, whose states follow the weights). `device`: "cuda" or "cpu" (only some scratch terms differ).
    `world_size` > 1: DDP (its buckets; `ddp_bucket_view=False` models torch's plain DDP, which keeps a
    second copy of every gradient) or, with `fsdp`, FSDP2's shards. `gradient_accumulation` > 1: the
    gradients of the earlier micro-steps are alive through the later ones. `options`: further
    `apollo.build_optimizer` options (only those the optimizer takes).
    """
    static = prepare(config, optimizer=optimizer, rank=rank, weight_quant=weight_quant,
                     weight_group_size=weight_group_size, weight_bits=weight_bits, stochastic_round=stochastic_round,
                     layerwise=layerwise, dtype=dtype, state_dtype=state_dtype, device=device, world_size=world_size,
                     gradient_accumulation=gradient_accumulation, ddp_bucket_view=ddp_bucket_view, fsdp=fsdp,
                     fsdp_mixed_precision=fsdp_mixed_precision, options=options)
    return combine(static, batch_size, max_length, activation_checkpointing=activation_checkpointing, packing=packing)


# ------------------------------------------------------------------------------------ the planner

#: memory mode -> the estimate() flags it sets
PLANNER_MODES = {"plain": {}, "int8 weights": {"weight_quant": True}, "layer-wise": {"layerwise": True},
                 "activation checkpointing": {"activation_checkpointing": True}}


def largest_batch(static: _Static, gpu_bytes: float, max_length: int, *, activation_checkpointing: bool = False,
                  packing: bool = False, limit: int = 1 << 20) -> int:
    """The largest micro-batch b (0 if none) whose estimated peak fits in `gpu_bytes`: the peak grows with b."""
    def fits(b: int) -> bool:
        return combine(static, b, max_length, activation_checkpointing=activation_checkpointing,
                       packing=packing).total <= gpu_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class PlanRow:
    optimizer: str
    mode: str
    batch: int | None  # None: refused
    peak: int = 0
    headroom: float = 0.0
    ratio: float | None = None  # batch / AdamW's batch in the same mode (or AdamW plain, `ratio_note`)
    note: str = ""


def planner_statics(config, *, optimizers: list[str] | None = None, modes: list[str] | None = None,
                    world_size: int = 1, fsdp: bool = False, fsdp_mixed_precision: bool = False,
                    dtype: str = "bfloat16", state_dtype: str | None = None, rank: int | None = None,
                    device: str = "cuda", weight_group_size: int = 128, gradient_accumulation: int = 1):
    """(optimizer, mode, the `_Static` of that run or the reason it is refused), AdamW first in each mode.

    A mode an optimizer refuses (train.optimizer_flags.MODES, layer-wise with several processes, int8 or
    layer-wise with FSDP2) gets its reason. One meta step per optimizer and weight format: activation
    checkpointing changes only the activations, layer-wise only when gradients and updates happen
    (the same states, tested), so both reuse the plain run's.
    """
    optimizers = [apollo.canonical_name(o) for o in (optimizers or apollo.optimizer_names())]
    cache: dict[tuple[str, bool], _Static | str] = {}
    for mode in modes or list(PLANNER_MODES):
        flags = PLANNER_MODES[mode]
        for name in ["adamw"] + [o for o in optimizers if o != "adamw"]:
            refusal = None
            for flag in ("weight_quant", "layerwise"):
                if flags.get(flag) and name in MODES[flag]:
                    refusal = MODES[flag][name]
            if flags.get("layerwise") and world_size > 1:
                refusal = "layer-wise updates run on one process"
            if fsdp and (flags.get("weight_quant") or flags.get("layerwise")):
                refusal = f"--fsdp does not combine with --{'weight_quant' if flags.get('weight_quant') else 'layerwise'}"
            if fsdp and name in MODES["fsdp"]:
                refusal = MODES["fsdp"][name]
            if refusal:
                yield name, mode, refusal
                continue
            int8 = flags.get("weight_quant", False)
            key = (name, int8)
            if key not in cache:
                try:
                    own_rank = rank if name in LOW_RANK and name != "apollo_mini" else None  # Mini: rank 1 by definition
                    cache[key] = prepare(config, optimizer=name, rank=own_rank, dtype=dtype,
                                         state_dtype=state_dtype, device=device, world_size=world_size, fsdp=fsdp,
                                         fsdp_mixed_precision=fsdp_mixed_precision, weight_group_size=weight_group_size,
                                         gradient_accumulation=gradient_accumulation, weight_quant=int8,
                                         stochastic_round=int8)
                except ValueError as error:
                    cache[key] = str(error)
            static = cache[key]
            if isinstance(static, _Static) and flags.get("layerwise"):
                static = dataclasses.replace(static, layerwise=True, accumulation=1, scratch=0, scratch_note="")
            yield name, mode, static


def plan(config, gpu_bytes: float, *, max_length: int = 256, optimizers: list[str] | None = None,
         modes: list[str] | None = None, packing: bool = False, statics=None, **settings) -> list[PlanRow]:
    """For each optimizer and memory mode: the largest micro-batch whose estimated peak fits in `gpu_bytes`.

    `settings`: those of `planner_statics` (world_size, fsdp, dtype, state_dtype, rank, device, ...);
    `statics`: its output, to plan several budgets from one set of meta steps. A refused mode gets
    `batch=None` and the reason. `ratio`: batch over AdamW's in the same mode (AdamW plain where AdamW
    cannot run the mode: noted).
    """
    chosen = [apollo.canonical_name(o) for o in (optimizers or apollo.optimizer_names())]
    if statics is None:
        statics = list(planner_statics(config, optimizers=optimizers, modes=modes, **settings))
    rows, adamw = [], {}
    for name, mode, static in statics:
        if isinstance(static, str):
            row = PlanRow(name, mode, None, note=static)
        else:
            ckpt = PLANNER_MODES[mode].get("activation_checkpointing", False)
            batch = largest_batch(static, gpu_bytes, max_length, activation_checkpointing=ckpt, packing=packing)
            peak = combine(static, max(batch, 1), max_length, activation_checkpointing=ckpt, packing=packing).total
            row = PlanRow(name, mode, batch, peak, gpu_bytes - peak)
            if name == "adamw":
                adamw[mode] = batch
        if name in chosen:
            rows.append(row)
    for row in rows:
        if row.batch is None:
            continue
        base = adamw.get(row.mode)
        if base is None:
            base, row.note = adamw.get("plain"), "ratio to AdamW plain (AdamW cannot run this mode)"
        row.ratio = row.batch / base if base else None
    return rows


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '24e9' -> 24e9 (bytes); a bare number under 10^4 is GB."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*(GB|GiB|MB|MiB|TB|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu_memory must look like 80GB or 80GiB, got {text!r}")
    value = float(match.group(1))
    unit = (match.group(2) or ("GB" if value < 1e4 else "B")).lower()
    return value * {"b": 1, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30, "tb": 1e12}[unit]


def format_plan(rows: list[PlanRow], gpu_bytes: float) -> list[str]:
    lines = [f"{'optimizer':<12}{'mode':<26}{'micro-batch':>12}{'peak GB':>10}{'headroom GB':>13}{'x AdamW':>9}"]
    for row in rows:
        if row.batch is None:
            lines.append(f"{row.optimizer:<12}{row.mode:<26}{'refused':>12}   ({row.note})")
            continue
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        note = f"  ({row.note})" if row.note else ""
        if row.batch == 0:
            lines.append(f"{row.optimizer:<12}{row.mode:<26}{0:>12}{row.peak / GB:>10.2f}{row.headroom / GB:>13.2f}"
                         f"{'-':>9}  (batch 1 does not fit){note}")
            continue
        lines.append(f"{row.optimizer:<12}{row.mode:<26}{row.batch:>12}{row.peak / GB:>10.2f}{row.headroom / GB:>13.2f}"
                     f"{ratio:>9}{note}")
    return lines


# ---------------------------------------------------------------------------------- measuring


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def live_bytes(*collections) -> int:
    """Bytes of the distinct storages behind the given tensors (what is alive before a step; a DTensor's
    local storage, FSDP2's padding included)."""
    storages = {}
    for tensors in collections:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t = _local(t)
                if t.device.type != "meta":
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _allocation_trace(prof) -> tuple[int, int]:
    """(peak, end) of bytes allocated by torch's CPU allocator during a profile, relative to its start.

    Every allocation event carries the allocator's running total of bytes allocated (and not yet
    freed) since memory profiling began; its maximum minus the total before the first event is the
    step's peak on top of what was already alive. Library-internal buffers (oneDNN/BLAS workspaces,
    gloo's) do not go through torch's allocator and are not seen.
    """
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        stack.extend(node.children)
    if not events:
        return 0, 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start, events[-1][1] - start


def _allocation_peak(prof) -> int:
    return _allocation_trace(prof)[0]


def _batch(vocab: int, batch_size: int, max_length: int, packing: bool, seed: int = 1):
    ids = torch.randint(2, vocab, (batch_size, max_length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if not packing:
        mask[0, max_length * 3 // 4:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def measure(config, *, optimizer: str = "adamw", batch_size: int = 1, max_length: int = 256, rank: int | None = None,
            weight_quant: bool = False, weight_group_size: int = 128, stochastic_round: bool = False,
            layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "float32",
            state_dtype: str | None = None, packing: bool = False, steps: int = 2, gradient_accumulation: int = 1,
            options: dict | None = None) -> int:
    """Measured peak bytes of real training steps on the CPU: the largest over `steps` steps.

    Per step: bytes alive before it (weights, buffers, optimizer state, batch) + the allocator's peak
    during forward, backward (`gradient_accumulation` micro-steps), update and zero_grad
    (`_allocation_peak`). The first step creates the optimizer state and refreshes every projection
    (GaLore's SVD), later ones are steady-state. The batch is random tokens, the last quarter of the
    first sequence padded (as C4 documents shorter than T are).
    """
    from torch.profiler import ProfilerActivity, profile

    name = apollo.canonical_name(optimizer)
    state_dtype = resolve_state_dtype(name, state_dtype)
    torch.manual_seed(0)
    model = build(config, dtype=dtype, device="cpu", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  stochastic_round=stochastic_round, activation_checkpointing=activation_checkpointing)
    model.train()
    opt = optimizer_for(model, name, rank=rank, state_dtype=state_dtype, layerwise=layerwise, options=options)
    ids, mask, labels = _batch(model.config.vocab_size, batch_size, max_length, packing)

    peak = 0
    for _ in range(steps):
        before = live_bytes(model.parameters(), model.buffers(), (ids, mask, labels),
                            (v for state in opt.state.values() for v in state.values()))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(gradient_accumulation):
                (model(input_ids=ids, attention_mask=mask, labels=labels).loss / gradient_accumulation).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = max(peak, before + _allocation_peak(prof))
    return peak


def _distributed_worker(rank: int, init_file: str, world_size: int, config, kwargs: dict, results) -> None:
    """One gloo process of `measure_distributed`: its peak and its optimizer-state bytes."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from train.distributed import Distributed, shard_model, wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mode, accumulation, steps = kwargs.pop("mode"), kwargs.pop("gradient_accumulation"), kwargs.pop("steps")
        batch_size, max_length, packing = kwargs.pop("batch_size"), kwargs.pop("max_length"), kwargs.pop("packing")
        name, options = apollo.canonical_name(kwargs.pop("optimizer")), kwargs.pop("options")
        rank_option, state_dtype = kwargs.pop("rank"), resolve_state_dtype(name, kwargs.pop("state_dtype"))
        torch.manual_seed(0)
        model = build(config, device="cpu", weight_quant=False, weight_group_size=128, **kwargs)
        model.train()
        ctx = Distributed(rank, rank, world_size, torch.device("cpu"))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            if mode == "fsdp":
                wrapped = shard_model(model, ctx, mixed_precision=False)
            else:
                wrapped = wrap_model(model, ctx, bucket_view=mode == "ddp")
        # DDP's buckets (the broadcast's transient buffers are gone); FSDP2's new shards are counted below as
        # the parameters' storage (freeing the whole tensors, allocated before the profile, is not seen)
        kept = _allocation_trace(prof)[1] if mode != "fsdp" else 0
        opt = optimizer_for(model, name, rank=rank_option, state_dtype=state_dtype, options=options)
        ids, mask, labels = _batch(model.config.vocab_size, batch_size, max_length, packing, seed=1 + rank)
        peak = 0
        for _ in range(steps):
            before = kept + live_bytes(model.parameters(), model.buffers(), (ids, mask, labels),
                                       (v for state in opt.state.values() for v in state.values()))
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                for micro in range(accumulation):
                    last = micro == accumulation - 1
                    # FSDP2 reduce-scatters every micro-step, as train/loop.py does
                    context = wrapped.no_sync() if mode != "fsdp" and not last else torch.enable_grad()
                    with context:
                        (wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss / accumulation).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            peak = max(peak, before + _allocation_peak(prof))
        results[rank] = (peak, apollo.optimizer_state_bytes(opt))
    finally:
        dist.destroy_process_group()


def measure_distributed(config, *, mode: str = "ddp", world_size: int = 2, optimizer: str = "adamw",
                        batch_size: int = 1, max_length: int = 256, rank: int | None = None, dtype: str = "float32",
                        state_dtype: str | None = None, packing: bool = False, gradient_accumulation: int = 1,
                        activation_checkpointing: bool = False, steps: int = 2,
                        options: dict | None = None) -> list[tuple[int, int]]:
    """Per rank (peak bytes, optimizer-state bytes) of real steps under `world_size` gloo processes on the CPU.

    `mode`: "ddp" (the harness's `BucketViewDDP`), "ddp_copy" (torch's plain DDP) or "fsdp" (FSDP2,
    `train.distributed.shard_model`). Each rank counts what is alive before a step (weights or its shards,
    buffers, state, batch, DDP's buckets: what the wrapper kept allocated) + its allocator's peak during the
    step (`gradient_accumulation` micro-steps, DDP's under no_sync but the last; FSDP2 syncs every one).
    """
    import tempfile

    import torch.multiprocessing as mp

    if mode not in ("ddp", "ddp_copy", "fsdp"):
        raise ValueError(f"mode must be ddp, ddp_copy or fsdp, got {mode!r}")
    kwargs = dict(mode=mode, gradient_accumulation=gradient_accumulation, steps=steps, batch_size=batch_size,
                  max_length=max_length, packing=packing, optimizer=optimizer, options=options, rank=rank,
                  state_dtype=state_dtype, dtype=dtype, activation_checkpointing=activation_checkpointing)
    with tempfile.TemporaryDirectory() as folder:
        results = mp.Manager().dict()
        mp.spawn(_distributed_worker, args=(f"{folder}/init", world_size, config, kwargs, results), nprocs=world_size,
                 join=True)
        return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------------- CLI


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a string (e.g. adjust_lr_fn=match_rms_adamw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_config", required=True, help="LLaMA config json, e.g. configs/llama_7b.json")
    parser.add_argument("--optimizer", default="adamw", help=" | ".join(apollo.optimizer_names()))
    parser.add_argument("--rank", type=int, default=None,
                        help="projection rank (default: the preset's, hidden/4; with --max_batch: every low-rank "
                             "optimizer but APOLLO-Mini, which keeps rank 1)")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a further apollo.build_optimizer option, e.g. precondition_frequency=1 (repeatable)")
    parser.add_argument("--batch_size", type=int, default=1, help="micro-batch, in sequences")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--gradient_accumulation", type=int, default=1, help="micro-batches per update")
    parser.add_argument("--weight_quant", action="store_true", help="int8 attention/MLP weights")
    parser.add_argument("--weight_bits", type=int, default=8, help="bits per quantised weight (8 only)")
    parser.add_argument("--weight_group_size", type=int, default=128, help="elements per quantisation group")
    parser.add_argument("--stochastic_round", action="store_true", help="stochastic re-quantisation (scratch only)")
    parser.add_argument("--layerwise", action="store_true", help="per-parameter updates during backward")
    parser.add_argument("--activation_checkpointing", action="store_true", help="recompute layers in backward")
    parser.add_argument("--packing", action="store_true", help="packed sequences: no padding mask")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="model dtype")
    parser.add_argument("--state_dtype", default=None, choices=("float32", "param"),
                        help="optimizer-state dtype (default: float32; torch AdamW, Muon, 8-bit AdamW follow the weights)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the step would run")
    parser.add_argument("--world_size", type=int, default=1,
                        help="data-parallel processes (> 1: DDP's buckets, or FSDP2's shards with --fsdp)")
    parser.add_argument("--ddp_copy", action="store_true",
                        help="model torch's plain DDP (a second copy of every gradient) instead of the harness's")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2: per-rank shards of weights, gradients, states")
    parser.add_argument("--fsdp_mixed_precision", action="store_true", help="with --fsdp: bf16 compute, fp32 reduction")
    parser.add_argument("--measure", action="store_true",
                        help="also run the step on this CPU (with --world_size N: N gloo processes) and print its peak")
    parser.add_argument("--measure_steps", type=int, default=2, help="steps --measure runs (the largest peak counts)")
    parser.add_argument("--max_batch", action="store_true",
                        help="the planner: largest micro-batch per optimizer and memory mode that fits --gpu_memory")
    parser.add_argument("--gpu_memory", default=None, help="the card's memory for --max_batch, e.g. 80GiB or 80GB")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated optimizers for --max_batch (default: every registered one)")
    return parser


def _print_estimate(args, result: Estimate, measured: int | None) -> None:
    mode = [args.optimizer + (f" rank {args.rank}" if args.rank else ""),
            *([f"int8 weights g{args.weight_group_size}"] if args.weight_quant else []),
            *(["layer-wise"] if args.layerwise else []),
            *(["activation checkpointing"] if args.activation_checkpointing else []),
            *([f"accumulation {args.gradient_accumulation}"] if args.gradient_accumulation > 1 else []),
            *([f"FSDP2 x {args.world_size}"] if args.fsdp else
              [f"{'plain ' if args.ddp_copy else ''}DDP x {args.world_size}"] if args.world_size > 1 else [])]
    print(f"{args.model_config}: {result.parameters / 1e6:.1f}M parameters | {', '.join(mode)} | batch {args.batch_size} x "
          f"{args.max_length} tokens | {args.dtype} weights, {result.notes['state dtype']} states")
    print("  largest in the step:")
    for term, value in result.terms().items():
        if term in ("gradients", "activations", "update scratch"):
            print(f"  {term:<17}{value / GB:8.3f} GB  {result.notes.get(term, '')}".rstrip())
    print(f"  at the peak ({result.peak_phase}), the terms of the total:")
    for term, value in result.breakdown.items():
        note = result.notes.get(term, "") if term in ("weights", "optimizer states") else ""
        print(f"    {term:<21}{value / GB:8.3f} GB  {note}".rstrip())
    print(f"  {'total (peak)':<17}{result.total / GB:8.3f} GB  = the sum of the terms above")
    others = ", ".join(f"{phase} {value / GB:.3f}" for phase, value in result.phases.items() if phase != result.peak_phase)
    print(f"  other phases: {others} GB")
    if measured is not None:
        print(f"  {'measured (CPU)':<17}{measured / GB:8.3f} GB  ({(measured - result.total) / 1e6:+.2f} MB, "
              f"{measured / result.total - 1:+.2%} vs the estimate)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from train.model import load_llama_config

        for flag in ("batch_size", "max_length", "weight_group_size", "world_size", "gradient_accumulation",
                     "measure_steps"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
        config = load_llama_config(args.model_config)
        options = dict(args.option)
        if args.max_batch:
            if args.gpu_memory is None:
                raise ValueError("--max_batch needs --gpu_memory, e.g. --gpu_memory 80GiB")
            gpu = parse_bytes(args.gpu_memory)
            optimizers = args.optimizers.split(",") if args.optimizers else None
            rows = plan(config, gpu, max_length=args.max_length, optimizers=optimizers, world_size=args.world_size,
                        fsdp=args.fsdp, fsdp_mixed_precision=args.fsdp_mixed_precision, dtype=args.dtype,
                        state_dtype=args.state_dtype, rank=args.rank, packing=args.packing, device=args.device,
                        weight_group_size=args.weight_group_size, gradient_accumulation=args.gradient_accumulation)
            where = (f"FSDP2 over {args.world_size} processes" if args.fsdp else
                     f"DDP over {args.world_size} processes" if args.world_size > 1 else "one process")
            print(f"{args.model_config}: largest micro-batch x {args.max_length} tokens whose estimated peak fits "
                  f"{gpu / GB:.1f} GB ({args.gpu_memory}), {where}, {args.dtype} weights; each optimizer's defaults")
            print("\n".join(format_plan(rows, gpu)))
            return 0
        settings = dict(optimizer=args.optimizer, batch_size=args.batch_size, max_length=args.max_length,
                        rank=args.rank, activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
                        state_dtype=args.state_dtype, packing=args.packing,
                        gradient_accumulation=args.gradient_accumulation, options=options)
        single = dict(weight_quant=args.weight_quant, weight_group_size=args.weight_group_size,
                      stochastic_round=args.stochastic_round, layerwise=args.layerwise)
        result = estimate(config, weight_bits=args.weight_bits, device="cpu" if args.measure else args.device,
                          world_size=args.world_size, ddp_bucket_view=not args.ddp_copy, fsdp=args.fsdp,
                          fsdp_mixed_precision=args.fsdp_mixed_precision, **settings, **single)
        measured, ranks = None, None
        if args.measure and args.world_size > 1:
            if args.weight_quant or args.layerwise or args.fsdp_mixed_precision:
                raise ValueError("--measure with --world_size runs float weights, no --layerwise/--fsdp_mixed_precision")
            mode = "fsdp" if args.fsdp else "ddp_copy" if args.ddp_copy else "ddp"
            ranks = measure_distributed(config, mode=mode, world_size=args.world_size, steps=args.measure_steps,
                                        **settings)
            measured = max(peak for peak, _ in ranks)
        elif args.measure:
            measured = measure(config, steps=args.measure_steps, **settings, **single)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_estimate(args, result, measured)
    if ranks:
        print("  per rank, measured: " + "; ".join(f"peak {peak / GB:.4f} GB, optimizer states {states} bytes"
                                                  for peak, states in ranks)
              + f" (estimated states {result.optimizer_states} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
