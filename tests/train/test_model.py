"""train.model: the configs reproduce PROTOCOL.md's parameter table; building is seeded and validated."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from train.model import build_model, load_llama_config, parameter_counts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# PROTOCOL.md: name -> (total params, attn+mlp low-rank params), in millions to 0.1M.
PROTOCOL_TABLE = {
    "9m": (9.0, 0.8),
    "20m": (19.5, 3.2),
    "35m": (35.2, 10.6),
    "60m": (58.1, 25.3),
    "130m": (134.1, 84.9),
    "350m": (368.0, 302.4),
    "1b": (1339.1, 1207.9),
    "3b": (2685.8, 2521.8),
    "7b": (6738.4, 6476.0),
    "13b": (13015.9, 12687.8),
}


def tiny_config(**overrides) -> LlamaConfig:
    # train.model's own config (pad id, no cache), sized for the closed-form parameter counts asserted below
    settings = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, pad_token_id=0, use_cache=False,
    )
    return LlamaConfig(**{**settings, **overrides})


@pytest.mark.parametrize("name", sorted(PROTOCOL_TABLE))
def test_parameter_counts_match_protocol_table(name):
    model = build_model(CONFIGS / f"llama_{name}.json", device="meta")
    counts = parameter_counts(model)
    total, low_rank = PROTOCOL_TABLE[name]
    assert round(counts["total"] / 1e6, 1) == total
    assert round(counts["low_rank"] / 1e6, 1) == low_rank
    assert counts["regular"] == counts["total"] - counts["low_rank"]


def test_config_folder_holds_exactly_the_protocol_sizes():
    assert sorted(p.stem for p in CONFIGS.glob("llama_*.json")) == sorted(f"llama_{n}" for n in PROTOCOL_TABLE)


@pytest.mark.parametrize("name", sorted(PROTOCOL_TABLE))
def test_configs_follow_the_protocol_architecture(name):
    config = load_llama_config(CONFIGS / f"llama_{name}.json")
    assert config.vocab_size == 32000
    assert config.hidden_act == "silu"
    assert config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings is False
    assert config.max_position_embeddings >= 1024
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.attention_bias is False and config.mlp_bias is False
    assert config.pad_token_id == 0  # t5's <pad>, never the published -1
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.initializer_range == 0.02
    model = build_model(config, device="meta")
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_parameter_counts_by_hand_on_a_tiny_model():
    counts = parameter_counts(build_model(tiny_config(), device="meta"))
    # per layer: q,k,v,o 4*32*32 + gate,up,down 3*32*64 = 10240; norms 2 per layer + final, 32 each.
    assert counts["low_rank"] == 2 * 10240
    assert counts["total"] == 2 * 10240 + 2 * 100 * 32 + 5 * 32
    assert parameter_counts(build_model(tiny_config(), device="meta"), target_modules=("mlp",))["low_rank"] == 2 * 6144


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not():
    def weights(seed):
        torch.manual_seed(seed)
        return [p.detach().clone() for p in build_model(tiny_config()).parameters()]

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_initialisation_is_normal_0_02_with_unit_norms():
    torch.manual_seed(0)
    model = build_model(CONFIGS / "llama_9m.json")
    linear = torch.cat([model.model.layers[i].mlp.up_proj.weight.flatten() for i in range(4)])
    assert abs(linear.std().item() - 0.02) < 2e-4  # 180k samples: std error ~3e-5
    assert abs(linear.mean().item()) < 2e-4
    assert abs(model.lm_head.weight.std().item() - 0.02) < 2e-4
    assert torch.equal(model.model.norm.weight, torch.ones(128))
    assert model.config._attn_implementation == "sdpa"
    # pad row 0 is zeroed by transformers (padding_idx); every other row is drawn.
    assert model.model.embed_tokens.weight[0].abs().sum() == 0
    assert abs(model.model.embed_tokens.weight[1:].std().item() - 0.02) < 2e-4


def test_meta_device_allocates_nothing():
    model = build_model(CONFIGS / "llama_7b.json", dtype="bfloat16", device="meta")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_bfloat16_weights_and_bad_dtype():
    model = build_model(tiny_config(), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="float16"):
        build_model(tiny_config(), dtype="float16")


def test_build_model_leaves_the_callers_config_unchanged():
    config = tiny_config()
    before = config.to_dict()
    build_model(config, dtype="bfloat16")
    assert config.to_dict() == before


def test_activation_checkpointing_gives_the_same_gradients():
    batch = torch.randint(1, 100, (2, 16))

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = build_model(tiny_config(), activation_checkpointing=checkpointing)
        model.train()
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        model(input_ids=batch, labels=batch).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer is run again in the backward pass
        return [p.grad for p in model.parameters()]

    for with_ckpt, without in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-5, atol=1e-7)


def test_forward_loss_of_a_fresh_model_is_near_log_vocab():
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=1000))
    batch = torch.randint(1, 1000, (4, 32))
    loss = model(input_ids=batch, labels=batch).loss.item()
    assert abs(loss - math.log(1000)) < 0.1  # N(0, 0.02) weights give near-uniform predictions


def test_load_llama_config_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_llama_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_llama_config(broken)
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match="gpt2.json.*not a llama config"):
        load_llama_config(gpt2)
    with pytest.raises(ValueError, match="nope.json"):
        build_model(missing)
