"""Adam-mini (apollo/adam_mini.py) against PEERS.md: a float64 re-derivation written here, a closed-form step,
the partition of a GQA LLaMA, state bytes, resume, bf16 with float32 state, meta, int8, layer-wise, AdamW."""
import io
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import apollo
from apollo.adam_mini import OPTIONS, AdamMini, build, partition


def _llama(dtype=torch.float32, *, hidden=64, heads=4, kv_heads=2, layers=2, vocab=128, inter=128, bias=False,
           seed=0, device=None):
    # its own sizes, not conftest's: Adam-mini's blocks follow head counts, biases and GQA, and the partition
    # tests below count the blocks of exactly these shapes
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=False, attention_bias=bias)
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(config).to(dtype)
    return LlamaForCausalLM(config).to(dtype)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------ the spec, re-derived in float64
def _blocks(name, shape):
    """The index sets of PEERS.md's blocks for a tiny LLaMA parameter (hidden 8, heads 4, kv 2, head_dim 2),
    written from the routing table, not from apollo.adam_mini. Returns (index list, decays)."""
    if name.endswith("bias"):
        return [(i,) for i in range(shape[0])], False  # one block per number
    if "q_proj" in name or "k_proj" in name:
        heads = 4 if "q_proj" in name else 2
        head_dim = 2
        assert shape[0] == heads * head_dim
        return [(slice(h * head_dim, (h + 1) * head_dim),) for h in range(heads)], True
    if any(role in name for role in ("embed_tokens", "lm_head", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj")):
        return [(i,) for i in range(shape[0])], True
    assert "norm" in name and len(shape) == 1
    return [(slice(None),)], False


def _reference_steps(weight, grads, name, *, lr, beta1, beta2, eps, weight_decay):
    """W after len(grads) steps of PEERS.md's Adam-mini, one block at a time, float64."""
    w = weight.detach().clone().double()
    m = torch.zeros_like(w)
    blocks, decays = _blocks(name, tuple(w.shape))
    v = [0.0] * len(blocks)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        new_w = w.clone()
        if decays:
            new_w = (1 - lr * weight_decay) * w
        for b, index in enumerate(blocks):
            index = tuple(index)
            v[b] = beta2 * v[b] + (1 - beta2) * float((g[index] ** 2).mean())
            denom = math.sqrt(v[b]) / math.sqrt(1 - beta2 ** t) + eps
            new_w[index] = new_w[index] - lr * (m[index] / (1 - beta1 ** t)) / denom
        w = new_w
    return w


def _gradients(params, steps, seed=7, scales=None):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        # rows of very different sizes: per-row, per-head and per-tensor v then differ visibly
        out.append([torch.randn(p.shape, generator=generator, dtype=torch.float64)
                    * (1 + torch.arange(p.shape[0], dtype=torch.float64).view(-1, *[1] * (p.dim() - 1)))
                    for p in params])
    return out


def test_update_equals_the_float64_re_derivation_on_a_gqa_llama():
    """4 steps on every parameter of a float64 LLaMA (q: 4 heads, k/v: 2 kv heads, head_dim 2, biases on):
    per-head, per-row, per-token, per-tensor and elementwise blocks, decay off for norms and biases."""
    model = _llama(torch.float64, hidden=8, heads=4, kv_heads=2, layers=1, vocab=10, inter=12, bias=True)
    hp = dict(lr=0.02, beta1=0.8, beta2=0.95, eps=1e-3, weight_decay=0.3)  # eps large enough that its place shows
    opt = build(model, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"])
    names, params = zip(*model.named_parameters())
    initial = [p.detach().clone() for p in params]
    grads = _gradients(params, 4)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for index, (name, p) in enumerate(zip(names, params)):
        expected = _reference_steps(initial[index], [g[index] for g in grads], name, **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=0, msg=name)
    assert {n for n in names if "bias" in n} == {f"model.layers.0.self_attn.{r}_proj.bias" for r in "qkvo"}


def test_closed_form_step_with_one_v_per_row():
    """2x3 weight, one v per row, step 1, lr 0.1, decay 0.1, eps 0: the bias corrections cancel, so
    W <- (1 - 0.01) W - 0.1 g / rms(g_row). Row 0: g = (2, -2, 2), rms 2; row 1: g = (1, 1, 5), rms 3."""
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64))
    w.grad = torch.tensor([[2.0, -2.0, 2.0], [1.0, 1.0, 5.0]], dtype=torch.float64)
    opt = AdamMini([w], lr=0.1, weight_decay=0.1, eps=0.0, block="row")
    opt.step()
    expected = torch.tensor([[0.89, 2.08, 2.87], [3.96 - 0.1 / 3, 4.95 - 0.1 / 3, 5.94 - 0.5 / 3]], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-14)
    state = opt.state[w]
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor([0.004, 0.009], dtype=torch.float64))  # 0.001 * (4, 9)
    assert state["step"] == 1 and state["exp_avg"].shape == (2, 3)


def test_with_every_block_elementwise_it_is_torch_adamw():
    """eps is added to the bias-corrected sqrt(v) in both (torch's placement), decay is decoupled."""
    torch.manual_seed(0)
    shapes = [(6, 5), (7,), (3, 2, 4)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=0.01, betas=(0.85, 0.99), eps=1e-4, weight_decay=0.2)
    opt = AdamMini(ours, block="elementwise", **kwargs)
    reference = torch.optim.AdamW(theirs, foreach=False, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_partition_of_a_gqa_llama():
    model = _llama(heads=4, kv_heads=2)
    groups = partition(model, weight_decay=0.1)
    by_name = {group["name"]: group for group in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {key: sorted(names[id(p)] for p in group["params"]) for key, group in by_name.items()}
    layers = range(2)
    assert members == {
        "embeddings": ["lm_head.weight", "model.embed_tokens.weight"],
        "q_proj": [f"model.layers.{i}.self_attn.q_proj.weight" for i in layers],
        "k_proj": [f"model.layers.{i}.self_attn.k_proj.weight" for i in layers],
        "rows": sorted(f"model.layers.{i}.{m}" for i in layers for m in (
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")),
        "norms": sorted([f"model.layers.{i}.{n}.weight" for i in layers
                         for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]),
    }
    settings = {key: (g["block"], g["num_heads"], g["weight_decay"]) for key, g in by_name.items()}
    assert settings == {"embeddings": ("row", None, 0.1), "q_proj": ("head", 4, 0.1), "k_proj": ("head", 2, 0.1),
                        "rows": ("row", None, 0.1), "norms": ("tensor", None, 0.0)}
    # blocks: q 4 heads, k 2 kv heads, v 32 rows, o/down 64, gate/up 128, tokens 128 each, norms 1 each
    opt = AdamMini(groups)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    v_sizes = {names[id(p)]: opt.state[p]["exp_avg_sq"].numel() for p in model.parameters()}
    assert v_sizes["model.layers.1.self_attn.q_proj.weight"] == 4
    assert v_sizes["model.layers.1.self_attn.k_proj.weight"] == 2
    assert v_sizes["model.layers.1.self_attn.v_proj.weight"] == 32
    assert v_sizes["model.layers.1.mlp.gate_proj.weight"] == 128
    assert v_sizes["model.layers.1.mlp.down_proj.weight"] == 64
    assert v_sizes["model.embed_tokens.weight"] == v_sizes["lm_head.weight"] == 128
    assert v_sizes["model.norm.weight"] == 1
    assert sum(v_sizes.values()) == 2 * (4 + 2 + 32 + 64 + 128 + 128 + 64 + 2) + 2 * 128 + 1


def test_partition_logs_counts_and_ties_share_one_group(caplog):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with caplog.at_level("INFO", logger="apollo.adam_mini"):
        groups = partition(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # the tied weight once
    text = caplog.text
    assert "head 2 tensors (5 blocks)" in text  # 4 q heads + 1 kv head
    assert f"row 6 tensors ({32 + 4 + 16 + 32 + 32 + 16} blocks)" in text  # tokens, v, o, gate, up, down
    assert "tensor 3 tensors (3 blocks)" in text and "3 tensors (norms, biases) without weight decay" in text


def test_wrong_head_count_is_refused_in_one_line():
    model = _llama(heads=4, kv_heads=2)
    model.config.num_attention_heads = 8  # head_dim stays 16: 8 x 16 = 128 rows, q_proj has 64
    with pytest.raises(ValueError, match=r"^adam_mini: model\.layers\.0\.self_attn\.q_proj\.weight has 64 rows, "
                                         r"not num_attention_heads x head_dim = 8 x 16 = 128 \(model config\)$"):
        partition(model)
    model = _llama(heads=4, kv_heads=2)
    model.config.num_key_value_heads = 4
    with pytest.raises(ValueError, match=r"k_proj\.weight has 32 rows, not num_key_value_heads x head_dim = 4 x 16"):
        build(model, lr=1e-3)


def test_validation_messages():
    w = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="block must be one of"):
        AdamMini([w])
    with pytest.raises(ValueError, match="block 'head' needs num_heads"):
        AdamMini([w], block="head")
    with pytest.raises(ValueError, match="6 rows of parameter 0 do not split into 4 heads"):
        AdamMini([w], block="head", num_heads=4)
    with pytest.raises(ValueError, match="block 'row' takes weights of 2 or more dimensions"):
        AdamMini([torch.nn.Parameter(torch.zeros(3))], block="row")
    with pytest.raises(ValueError, match="invalid beta2 1.0"):
        AdamMini([w], block="row", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"param group 'x': invalid learning rate -1"):
        AdamMini([{"params": [w], "name": "x", "lr": -1.0}], block="row")
    with pytest.raises(ValueError, match="state_dtype must be None"):
        AdamMini([w], block="row", state_dtype="int8")
    with pytest.raises(ValueError, match="'adam_mini' does not take option.s. rank"):
        build(_llama(layers=1), lr=1e-3, rank=4)
    assert OPTIONS == {"betas", "eps", "state_dtype"}
    assert AdamMini([w], block="row", state_dtype=torch.float32).param_groups[0]["state_dtype"] == "float32"


# ------------------------------------------------------------------------------- state and modes
def _state_numbers(hidden=64, inter=128, vocab=128, layers=2, kv=32):
    """m (every weight) + v (q 4 heads, k 2, v kv rows, o hidden rows, gate/up inter rows, down hidden rows,
    2 norms per layer 1 each; embed/lm_head one per token, final norm 1)."""
    per_layer_m = hidden * hidden * 2 + kv * hidden * 2 + 3 * inter * hidden + 2 * hidden
    per_layer_v = 4 + 2 + kv + hidden + 2 * inter + hidden + 2
    m = layers * per_layer_m + 2 * vocab * hidden + hidden
    v = layers * per_layer_v + 2 * vocab + 1
    tensors = layers * 9 + 3
    return m + v, tensors


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype,state_dtype,size", [(torch.float32, None, 4), (torch.bfloat16, None, 2),
                                                    (torch.bfloat16, "float32", 4)])
def test_state_bytes_equal_the_formula(device, dtype, state_dtype, size):
    """mn + #blocks numbers per matrix (+ 8 bytes of step), exact, also when stepped on the meta device."""
    model = _llama(dtype, device=device)
    opt = build(model, lr=1e-3, state_dtype=state_dtype)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if device == "cpu" else torch.empty_like(p)
    opt.step()
    numbers, tensors = _state_numbers()
    assert apollo.optimizer_state_bytes(opt) == numbers * size + 8 * tensors
    state = opt.state[model.model.layers[0].self_attn.k_proj.weight]
    assert state["exp_avg_sq"].shape == (2,) and state["exp_avg"].device.type == device
    assert state["exp_avg"].dtype == (torch.float32 if state_dtype else dtype)


def _toy_params(dtype):
    torch.manual_seed(0)
    shapes = [(8, 3), (6, 4), (5,), (4,), (9, 2)]
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def _toy_optimizer(params, state_dtype=None):
    q, rows, norm, bias, tensor = params
    return AdamMini([{"params": [q], "block": "head", "num_heads": 4}, {"params": [rows], "block": "row"},
                     {"params": [norm], "block": "tensor", "weight_decay": 0.0},
                     {"params": [bias], "block": "elementwise", "weight_decay": 0.0},
                     {"params": [tensor], "block": "tensor"}],
                    lr=0.01, weight_decay=0.1, state_dtype=state_dtype)


def _train(opt, params, start, stop):
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        opt.step()


def test_bfloat16_weights_with_float32_state_follow_the_float64_update():
    bf16 = _toy_params(torch.bfloat16)
    start = [p.detach().double() for p in bf16]
    opt = _toy_optimizer(bf16, "float32")
    wide = [torch.nn.Parameter(p.clone()) for p in start]
    reference = _toy_optimizer(wide)
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        for p, q in zip(bf16, wide):
            q.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16).double()
            p.grad = q.grad.to(torch.bfloat16)
        opt.step()
        reference.step()
    for p, q, s in zip(bf16, wide, start):
        state, wide_state = opt.state[p], reference.state[q]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        # the moments see the same gradients: equal to float32 round-off (bf16 moments would be off by 2^-9)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key].double(), wide_state[key], rtol=1e-6, atol=1e-9)
        assert (q.detach() - s).abs().max() > 0.025  # 3 steps of about lr 0.01 each
        # two bf16 roundings per step (decay, update), each at most half an ulp <= 2^-8 |w|
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=6 * 2 ** -8, atol=1e-6)
