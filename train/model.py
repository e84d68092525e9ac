"""LLaMA models for the harness: a json config in `configs/` -> `transformers.LlamaForCausalLM`.

The architecture is the one of PROTOCOL.md: SwiGLU MLP (`hidden_act` silu), RMSNorm (eps 1e-6),
RoPE (theta 10000), no biases, untied embedding and lm_head, weights drawn from N(0, 0.02)
(`initializer_range`, applied by transformers' own `_init_weights`), attention through torch's
`scaled_dot_product_attention` ("sdpa").

`pad_token_id` is 0 (t5's `<pad>`), so transformers zeroes embedding row 0 and it never receives a
gradient; that row is only ever read at padded positions, which come after a document's end
(right padding) and are masked out of the loss. (The published configs used -1, which zeroed the
real token 31999 instead.)

Seeding is the caller's job: `torch.manual_seed(s)` before `build_model` gives bit-identical weights
for the same `s`.

`compile_layers` (--compile) compiles each decoder layer's forward with torch.compile (inductor), after
activation checkpointing and before FSDP2/DDP (torchtitan's order): module hooks (FSDP2's all-gathers)
stay outside the compiled code, the state dict keeps its names, and every layer shares one graph.
`flops_per_token` is torchtitan's model-FLOPs count behind MFU.
"""
from __future__ import annotations

import copy
import functools
import json
from os import PathLike
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from apollo.routing import DEFAULT_TARGETS, TargetSpec, select_target_modules

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_llama_config(path: str | PathLike) -> LlamaConfig:
    """Read a Hugging Face LlamaConfig json file; any problem is one `ValueError` naming the path."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model config {path}: cannot read a json file ({error})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"model config {path}: not a llama config (model_type is {found!r}, expected 'llama')")
    try:
        return LlamaConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"model config {path}: invalid llama config ({message})") from None


def build_model(
    config: str | PathLike | LlamaConfig,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    activation_checkpointing: bool = False,
) -> LlamaForCausalLM:
    """Build a freshly initialised `LlamaForCausalLM` directly in `dtype` on `device`.

    `device="meta"` allocates nothing (shapes and parameter counts of 7B/13B on any machine).
    Weights are created in `dtype` (no float32 copy first), so a bf16 7B never needs 28 GB.
    Activation checkpointing recomputes each decoder layer in the backward pass (non-reentrant).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: choose one of {sorted(DTYPES)}")
    if not isinstance(config, LlamaConfig):
        config = load_llama_config(config)
    # transformers writes the dtype into the config it is given; keep the caller's config untouched.
    config = copy.deepcopy(config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: LlamaForCausalLM) -> None:
    """Recompute every decoder layer in the backward pass (torch's non-reentrant checkpoint)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_counts(model: nn.Module, target_modules: TargetSpec = DEFAULT_TARGETS) -> dict[str, int]:
    """Count parameters: `total`, `low_rank` and `regular` (= total - low_rank).

    `low_rank` is the number of elements in the 2-D weights of the linear layers `target_modules` chooses
    (`apollo.routing`'s one selection; default: names containing "attn" or "mlp", LLaMA's q/k/v/o and
    gate/up/down projections) - the weights a low-rank optimizer projects. Works on meta tensors.
    """
    total = sum(p.numel() for p in model.parameters())
    low_rank = sum(module.weight.numel() for _, module in select_target_modules(model, target_modules)
                   if module.weight.dim() == 2)
    return {"total": total, "low_rank": low_rank, "regular": total - low_rank}


def _class_forward(layer: nn.Module, *args, **kwargs):
    """The layer's forward as its class defines it now (FSDP2 swaps the class for a subclass whose forward
    is the one that checkpoints), so the compiled function follows the layer through fully_shard."""
    return type(layer).forward(layer, *args, **kwargs)


def compile_layers(model: LlamaForCausalLM) -> int:
    """Compile every decoder layer's forward in place with `torch.compile(dynamic=False)`; returns the count.

    Shapes are fixed (every batch is (B, max_length)), so a run compiles once for training and once for
    evaluation; `dynamic=False` keeps one specialised kernel set rather than a symbolic one after the
    first shape change. All layers run the same code, so they share one graph (parameters are graph
    inputs). With activation checkpointing the checkpoint is traced inside the compiled layer; the
    transformers hub-kernel bookkeeping it sets while tracing is a side effect that the recompute in
    backward need not repeat, which dynamo must be told (`skip_fwd_side_effects_in_bwd_under_checkpoint`).
    """
    layers = model.model.layers
    for layer in layers:
        compiled = torch.compile(functools.partial(_class_forward, layer), dynamic=False)

        def forward(*args, _compiled=compiled, **kwargs):
            with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
                return _compiled(*args, **kwargs)

        layer.forward = forward  # an instance attribute: module hooks and state-dict names are unchanged
    return len(layers)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def flops_per_token(config: LlamaConfig, seq_len: int, params: int) -> int:
    """Model FLOPs per trained token, torchtitan's count: 6 (N - N_embedding) + 12 L H d_head T.

    6N: forward (2 FLOPs per weight per token) plus backward (4); the input embedding is a lookup, not a
    matmul, so its V x d weights are left out (the untied lm_head is a matmul and counts). 12 L H d_head T:
    the attention scores QK^T and the weighted sum AV, 2 matmuls x 2 FLOPs x T x d_head per head and layer,
    times 3 for forward + backward (counted over the full T x T square, as torchtitan does). Activation
    checkpointing's recompute is not counted (MFU counts the model's FLOPs, not the hardware's).
    """
    embedding = config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6 * (params - embedding) + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
