r"""The activation term of a step's memory: what autograd saves for backward, by formula.

Notation (bytes; `train.memory`'s docstring): p bytes per element of the compute dtype, N = B x T tokens,
h, I, L, V, nh, kv, hd the LLaMA sizes (hidden, intermediate, layers, vocab, heads, key/value heads,
head dim).

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
               adapters (--adapter, rank r, train/adapters.py), per layer and token, on the 7 projections:
                                      7 r p                   A x, saved for B's gradient
                                    + (p + 1) (5h + nh hd + I)  with dropout: each adapter's dropped input
                                                            (saved for A's gradient) and its bool mask
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Activations:
    """Activation memory of a step, in bytes (module docstring)."""

    saved: int  # saved for backward at the end of the forward pass
    loss_work: int  # the loss's working set at the start of backward (fp32 gradients, 8 V N)
    log_softmax: int  # the saved fp32 log-softmax (4 V N), freed before the lm_head gradient exists
    outside: int  # the part of `saved` outside the decoder layers
    recompute: int  # activation checkpointing: one layer recomputed + its backward temporaries


def activations(config, batch_size: int, seq_len: int, p: int, *, checkpointing: bool = False,
                padded: bool = True, adapter_rank: int = 0, adapter_dropout: bool = False) -> Activations:
    """Saved activations and the loss's working set, by the per-layer formula of the module docstring."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    tokens = batch_size * seq_len
    layer = 2 * (4 + 2 * p) * h + 8 + p * (2 * h + 2 * kv * hd) + 4 * heads + 4 * p * inter + (p * seq_len if padded else 0)
    if adapter_rank:  # inputs of q, k, v, gate, up (h each), o (nh hd) and down (I)
        layer += 7 * adapter_rank * p + ((p + 1) * (5 * h + heads * hd + inter) if adapter_dropout else 0)
    outside = tokens * ((4 + 2 * p) * h + 4 + 4 * vocab + 16) + 2 * seq_len * hd * p  # RoPE cos/sin: one (T, hd) each
    if checkpointing:
        saved, recompute = tokens * layers * p * h + outside, tokens * (layer + 3 * p * inter + 4 * p * h + 8 * h)
    else:
        saved, recompute = tokens * layers * layer + outside, 0
    return Activations(saved, 8 * vocab * tokens, 4 * vocab * tokens, outside, recompute)
