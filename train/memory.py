r"""Memory of one LLaMA pretraining step: estimated without allocating anything, or measured on the CPU.

    python -m train.memory --model_config configs/llama_7b.json --optimizer apollo_mini --rank 1 \
        --batch_size 1 --max_length 256 --weight_quant --layerwise        # add --measure to run it for real

The model is built on the meta device (shapes only) exactly as the training loop builds it, quantised
with `apollo.quant.quantize_model` when asked, and the real optimizer takes one step on it, so the
optimizer-state count comes from apollo's own state tensors and cannot drift from the code. In bytes,
with p the bytes per element of the model dtype, s of the optimizer state, n a parameter's size,
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
scratch        temporaries of the update. apollo's fused path (float weights, apollo/fused.py): regular
               parameters none (torch's fused AdamW kernel, in place) unless the state dtype differs
               from the weights' (then the plain spec AdamW, n (s + p)); low-rank weights a chunk at a
               time: P (p |P|), R and the direction (s |R| each) of every weight of the chunk + one
               weight's transient (P drawn in float32, the SVD 4 (n + m k + k n) at a refresh, GaLore's
               back-projection p n). int8 weights take the plain path: APOLLO 2 p n (bf16: 6 n),
               GaLore/SVD as above, + their float32 copy 4 n, re-quantised in place (+ n for q, + 4 n
               of noise when stochastic). torch AdamW 2 p n on the CPU, on CUDA p N_all (its foreach
               path takes sqrt(v) of every parameter at once)
DDP buckets    with several processes: one more copy of every float gradient (torch's reducer)
total (peak)   weights + states (+ DDP buckets) + the largest of these phases of a step:
                 backward start       activations (no gradient yet)
                 lm_head grad ready   saved - 4 V N (log-softmax freed) + recompute + lm_head grad
                                      (layer-wise: + the largest gradient + scratch of a non-embedding weight)
                 end of backward      outside-layer activations - 4 V N + recompute + all gradients
                                      (layer-wise: + the embedding's gradient + scratch, which come last)
                 optimizer step       all gradients + scratch (normal mode)
               Activations are freed as gradients appear, so the peak sits at one of these ends.
Validated against measured CPU peaks (--measure; docs/memory.md).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

import apollo
from apollo.fused import step_chunks
from apollo.layerwise import LayerwiseOptimizer
from apollo.projection import projected_shape, projection_shape, projection_side
from apollo.quant import QuantLinear, is_quantized, quantize_model

GB = 1e9  # decimal gigabytes; a "12 GB" claim is checked against 12e9 bytes (GiB would be more lenient)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class Estimate:
    """Bytes per term; `total` is the modelled peak (see the module docstring)."""

    parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    update_scratch: int
    total: int
    notes: dict[str, str] = field(default_factory=dict)
    ddp_buckets: int = 0  # DistributedDataParallel's flat gradient buckets (several processes only)

    def terms(self) -> dict[str, int]:
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer states": self.optimizer_states,
                 "activations": self.activations, "update scratch": self.update_scratch}
        if self.ddp_buckets:
            terms["DDP buckets"] = self.ddp_buckets
        return {**terms, "total (peak)": self.total}


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


def optimizer_for(model: nn.Module, name: str, *, rank: int | None, state_dtype: str | None,
                  layerwise: bool = False, lr: float = 1e-3):
    """The optimizer train/loop.py would build (state_dtype "param" means: follow the weights)."""
    options = {} if name == "adamw" else {"rank": rank, "state_dtype": None if state_dtype == "param" else state_dtype}
    if layerwise:
        return LayerwiseOptimizer(model, name, lr=lr, **options)
    return apollo.build_optimizer(name, model, lr=lr, **options)


def step_on_meta(model: nn.Module, name: str, *, rank: int | None, state_dtype: str | None, p_dtype):
    """Run the real optimizer's first step on the meta device; returns the optimizer, its state created."""
    optimizer = optimizer_for(model, name, rank=rank, state_dtype=state_dtype)
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
    s = 4 if group.get("state_dtype") == "float32" else p
    quantized = is_quantized(param)
    if group.get("rank") is None:
        # torch's fused AdamW kernel works in place; it needs the moments in the weight's dtype
        scratch = 0 if s == p and not quantized else n * (s + (p if s != p else 0))
    elif not quantized:
        phases = _fused_low_rank_scratch(param, group, name=name, p=p, device=device)
        proj_held, proj_transient, held, held_without_r, update = phases
        scratch = max(proj_held + proj_transient, held, held_without_r + update)
    else:
        m, k = param.shape[0], min(param.shape)
        svd = 4 * (n + m * k + k * param.shape[1]) + (4 * n if p != 4 else 0)
        apollo_update = max(2 * p * n, p * n + (4 * n if p != 4 else 0))
        if name == "galore":
            scratch = max(p * n, svd)
        else:
            scratch = max(apollo_update, svd if group.get("proj") == "svd" else 0)
    if quantized:
        scratch = 4 * n + max(scratch, n * (1 + (4 if stochastic_round else 0)))
    return scratch


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
    s = 4 if group.get("state_dtype") == "float32" else p
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


def estimate(config, *, optimizer: str = "adamw", batch_size: int = 1, max_length: int = 256, rank: int | None = None,
             weight_quant: bool = False, weight_group_size: int = 128, weight_bits: int = 8, stochastic_round: bool = False,
             layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "bfloat16",
             state_dtype: str | None = None, packing: bool = False, device: str = "cuda", world_size: int = 1) -> Estimate:
    """Estimate the memory of a training step (module docstring); nothing is allocated.

    `config`: a LlamaConfig or a path to its json. `state_dtype`: "float32" or "param"; None picks the
    harness default (float32 for APOLLO/GaLore, the weights' dtype for torch's AdamW, which ignores it).
    `device`: "cuda" or "cpu" (only torch AdamW's scratch differs). `world_size` > 1 adds DDP's
    gradient buckets: torch's reducer keeps a flat copy of every gradient that requires grad (int8
    weights' float_grad is reduced in place) unless DDP is built with gradient_as_bucket_view=True.
    """
    name = apollo.canonical_name(optimizer)
    if state_dtype is None or name == "adamw":
        state_dtype = "param" if name == "adamw" else "float32"
    p = DTYPE_BYTES[dtype]
    model = build(config, dtype=dtype, device="meta", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  weight_bits=weight_bits)
    config = model.config
    p_dtype = next(p_ for p_ in model.parameters() if p_.is_floating_point()).dtype

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(_bytes(t) for t in tensors.values())
    optimizer_on_meta = step_on_meta(model, name, rank=rank, state_dtype=state_dtype, p_dtype=p_dtype)
    states = apollo.optimizer_state_bytes(optimizer_on_meta)
    groups = {id(param): group for group in optimizer_on_meta.param_groups for param in group["params"]}
    names = {id(param): param_name for param_name, param in model.named_parameters()}
    trainable = [q for q in model.parameters() if q.requires_grad or is_quantized(q)]
    per_param = [(names[id(q)], _grad_bytes(q, p),
                  update_scratch(q, groups.get(id(q)), name=name, p=p, device=device, stochastic_round=stochastic_round))
                 for q in trainable]
    acts = activations(config, batch_size, max_length, p, checkpointing=activation_checkpointing, padded=not packing)
    # one dequantised weight: float32, then cast to the model dtype
    dequantised = max(((4 + (p if p != 4 else 0)) * q.numel() for q in trainable if is_quantized(q)), default=0)

    # Phases (module docstring): forward's end / backward's start (no gradient yet; an int8 layer's
    # dequantised weight lives only inside its own forward or backward), just after the lm_head
    # gradient (the loss's buffers are gone), the last layers (checkpointing: a recomputed layer), the end.
    activation_peak = acts.saved + max(acts.loss_work, acts.recompute, dequantised)
    start = activation_peak
    after_head = acts.saved - acts.log_softmax + acts.recompute
    remaining = acts.outside - acts.log_softmax  # what is still saved when the last layer's gradients appear
    notes = {"state dtype": dtype if state_dtype == "param" else state_dtype}
    embedding = names[id(model.get_input_embeddings().weight)]
    if layerwise:  # one gradient (and its update's scratch) at a time; the embedding's comes last
        during = max((g + x for n, g, x in per_param if n != embedding), default=0)
        last = max((g + x for n, g, x in per_param if n == embedding), default=0)
        worst = max(per_param, key=lambda item: item[1] + item[2])
        gradients, scratch = worst[1], worst[2]
        notes["gradients"] = f"largest single gradient ({worst[0]}), freed at once"
        notes["update scratch"] = f"temporaries of {worst[0]}'s update"
        peak = max(start, after_head + during, remaining + last)
    else:
        gradients = sum(g for _, g, _ in per_param)
        if name == "adamw" and device == "cuda":
            scratch = gradients  # the foreach path takes sqrt(v) of every parameter at once
            notes["update scratch"] = "torch AdamW (foreach): sqrt of every second moment at once"
        else:
            worst = max(per_param, key=lambda item: item[2])
            scratch = worst[2]
            notes["update scratch"] = f"temporaries of {worst[0]}'s update"
            chunked = max((fused_step_scratch(g, name=name, p=p, device=device)
                           for g in optimizer_on_meta.param_groups if g.get("rank") is not None), default=0)
            if name != "adamw" and chunked > scratch:
                scratch = chunked
                notes["update scratch"] = "the fused low-rank step's largest chunk (P, R, direction)"
        head = _grad_bytes(model.get_output_embeddings().weight, p)
        peak = max(start, after_head + head, remaining + acts.recompute + gradients, gradients + scratch)
        notes["gradients"] = "every parameter's gradient"
    buckets = sum(_bytes(q) for q in model.parameters() if q.requires_grad) if world_size > 1 else 0
    total = weights + states + buckets + peak
    notes["activations"] = (f"saved {acts.saved / GB:.3f} + the largest of: loss {acts.loss_work / GB:.3f}"
                            + (f", recomputed layer {acts.recompute / GB:.3f}" if activation_checkpointing else "")
                            + (f", dequantised weight {dequantised / GB:.3f}" if dequantised else ""))
    if weight_quant:
        quantized = [q for q in trainable if is_quantized(q)]
        int8 = sum(q.numel() for q in quantized)
        extra = sum(_bytes(m.weight_scales) + _bytes(m.weight_zeros) + _bytes(m.rounding_state)
                    for m in model.modules() if isinstance(m, QuantLinear))
        rest = weights - int8 - extra
        notes["weights"] = f"int8 {int8 / GB:.2f} + scales/zeros {extra / GB:.2f} + {dtype} {rest / GB:.2f}"
    parameters = sum(q.numel() for q in model.parameters())
    return Estimate(parameters, weights, gradients, states, activation_peak, scratch, total, notes, buckets)


# ---------------------------------------------------------------------------------- measuring


def live_bytes(*collections) -> int:
    """Bytes of the distinct storages behind the given tensors (what is alive before a step)."""
    storages = {}
    for tensors in collections:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _allocation_peak(prof) -> int:
    """Peak of bytes allocated by torch's CPU allocator during a profile, relative to its start.

    Every allocation event carries the allocator's running total of bytes allocated (and not yet
    freed) since memory profiling began; its maximum minus the total before the first event is the
    step's peak on top of what was already alive. Library-internal buffers (oneDNN/BLAS workspaces)
    do not go through torch's allocator and are not seen.
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
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


def measure(config, *, optimizer: str = "adamw", batch_size: int = 1, max_length: int = 256, rank: int | None = None,
            weight_quant: bool = False, weight_group_size: int = 128, stochastic_round: bool = False,
            layerwise: bool = False, activation_checkpointing: bool = False, dtype: str = "float32",
            state_dtype: str | None = None, packing: bool = False, steps: int = 2) -> int:
    """Measured peak bytes of real training steps on the CPU: the largest over `steps` steps.

    Per step: bytes alive before it (weights, buffers, optimizer state, batch) + the allocator's peak
    during forward, backward, update and zero_grad (`_allocation_peak`). The first step creates the
    optimizer state and refreshes every projection (GaLore's SVD), later ones are steady-state. The
    batch is random tokens, the last quarter of the first sequence padded (as C4 documents shorter
    than T are).
    """
    from torch.profiler import ProfilerActivity, profile

    name = apollo.canonical_name(optimizer)
    if state_dtype is None or name == "adamw":
        state_dtype = "param" if name == "adamw" else "float32"
    torch.manual_seed(0)
    model = build(config, dtype=dtype, device="cpu", weight_quant=weight_quant, weight_group_size=weight_group_size,
                  stochastic_round=stochastic_round, activation_checkpointing=activation_checkpointing)
    model.train()
    opt = optimizer_for(model, name, rank=rank, state_dtype=state_dtype, layerwise=layerwise)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (batch_size, max_length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if not packing:
        mask[0, max_length * 3 // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    peak = 0
    for _ in range(steps):
        before = live_bytes(model.parameters(), model.buffers(), (ids, mask, labels),
                            (v for state in opt.state.values() for v in state.values()))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = max(peak, before + _allocation_peak(prof))
    return peak


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_config", required=True, help="LLaMA config json, e.g. configs/llama_7b.json")
    parser.add_argument("--optimizer", default="adamw", help="adamw | apollo | apollo_mini | apollo_svd | galore")
    parser.add_argument("--rank", type=int, default=None, help="projection rank (default: the preset's)")
    parser.add_argument("--batch_size", type=int, default=1, help="micro-batch, in sequences")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--weight_quant", action="store_true", help="int8 attention/MLP weights")
    parser.add_argument("--weight_bits", type=int, default=8, help="bits per quantised weight (8 only)")
    parser.add_argument("--weight_group_size", type=int, default=128, help="elements per quantisation group")
    parser.add_argument("--stochastic_round", action="store_true", help="stochastic re-quantisation (scratch only)")
    parser.add_argument("--layerwise", action="store_true", help="per-parameter updates during backward")
    parser.add_argument("--activation_checkpointing", action="store_true", help="recompute layers in backward")
    parser.add_argument("--packing", action="store_true", help="packed sequences: no padding mask")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="model dtype")
    parser.add_argument("--state_dtype", default=None, choices=("float32", "param"),
                        help="optimizer-state dtype (default: float32 for APOLLO/GaLore; torch AdamW follows the weights)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the step would run")
    parser.add_argument("--world_size", type=int, default=1,
                        help="data-parallel processes (> 1 adds DDP's gradient buckets)")
    parser.add_argument("--measure", action="store_true", help="also run the step on this CPU and print its measured peak")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from train.model import load_llama_config

        for flag in ("batch_size", "max_length", "weight_group_size", "world_size"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
        config = load_llama_config(args.model_config)
        settings = dict(optimizer=args.optimizer, batch_size=args.batch_size, max_length=args.max_length,
                        rank=args.rank, weight_quant=args.weight_quant, weight_group_size=args.weight_group_size,
                        stochastic_round=args.stochastic_round, layerwise=args.layerwise,
                        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
                        state_dtype=args.state_dtype, packing=args.packing)
        if args.measure and args.world_size > 1:
            raise ValueError("--measure runs one process on this CPU; drop --world_size")
        result = estimate(config, weight_bits=args.weight_bits, device="cpu" if args.measure else args.device,
                          world_size=args.world_size, **settings)
        measured = measure(config, **settings) if args.measure else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mode = [args.optimizer + (f" rank {args.rank}" if args.rank else ""),
            *([f"int8 weights g{args.weight_group_size}"] if args.weight_quant else []),
            *(["layer-wise"] if args.layerwise else []),
            *(["activation checkpointing"] if args.activation_checkpointing else [])]
    print(f"{args.model_config}: {result.parameters / 1e6:.1f}M parameters | {', '.join(mode)} | batch {args.batch_size} x "
          f"{args.max_length} tokens | {args.dtype} weights, {result.notes['state dtype']} states")
    for term, value in result.terms().items():
        note = result.notes.get(term, "")
        print(f"  {term:<17}{value / GB:8.3f} GB  {note}".rstrip())
    if measured is not None:
        print(f"  {'measured (CPU)':<17}{measured / GB:8.3f} GB  ({measured / result.total - 1:+.1%} vs the estimate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
