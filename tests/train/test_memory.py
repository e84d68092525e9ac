"""The memory estimator: closed-form terms on a tiny LLaMA, agreement with a measured CPU peak, the 7B claim, the CLI."""
from pathlib import Path

import pytest
from transformers import LlamaConfig

from train import memory

REPO_ROOT = Path(__file__).resolve().parents[2]

# h 32, I 64, 4 heads (hd 8), 2 layers, V 96: N = 2 x 96 x 32 + 2 (4 x 32^2 + 3 x 32 x 64 + 2 x 32) + 32 = 26784
TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
N, TENSORS, ROPE_BUFFERS = 26784, 21, 2 * 4 * 4  # 21 parameter tensors; inv_freq and its copy: 4 floats each


def _estimate(**kwargs):
    return memory.estimate(TINY, batch_size=2, max_length=16, dtype="float32", device="cpu", **kwargs)


def test_adamw_terms_in_closed_form():
    e = _estimate(optimizer="adamw")
    assert e.parameters == N
    assert e.weights == 4 * N + ROPE_BUFFERS
    assert e.gradients == 4 * N
    assert e.optimizer_states == 2 * 4 * N + 4 * TENSORS  # exp_avg, exp_avg_sq, and torch's float32 step tensor
    # per layer and token: 2 (4 + 2p) h + 8 + p (2h + 2 kv hd) + 4 nh + 4 p I + p T
    #   = 768 + 8 + 512 + 16 + 1024 + 64 = 2392, x 32 tokens x 2 layers = 153088
    # outside, per token: (4 + 2p) h + 4 + 4 V + 16 = 384 + 4 + 384 + 16 = 788, x 32 = 25216;
    # RoPE cos, sin: 2 T hd p = 2 x 16 x 8 x 4 = 1024; loss working set 8 V N = 8 x 96 x 32 = 24576
    assert e.activations == 153088 + 25216 + 1024 + 24576
    assert e.update_scratch == 2 * 4 * 96 * 32  # torch AdamW on the CPU: two temporaries of the largest tensor
    assert e.total == e.weights + e.optimizer_states + e.activations  # the peak is at the start of backward
    layerwise = _estimate(optimizer="adamw", layerwise=True)
    assert layerwise.gradients == 4 * 96 * 32 and layerwise.optimizer_states == e.optimizer_states


def test_apollo_mini_and_int8_terms_in_closed_form():
    e = _estimate(optimizer="apollo_mini")
    # low-rank m x n: M, V of 1 x max(m, n) float32 + step, seed (8 each) + limiter norm (4): 8 L + 20
    low_rank = 2 * (4 * (8 * 32 + 20) + 3 * (8 * 64 + 20))
    regular = 96 * 32 * 2 + 32 + 2 * 2 * 32  # embeddings, lm_head, norms: the spec's AdamW, 2 float32 moments + step
    assert e.optimizer_states == low_rank + 8 * regular + 8 * 7
    q = _estimate(optimizer="apollo_mini", weight_quant=True, weight_group_size=32, layerwise=True)
    int8 = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    # 1 byte per int8 element + 5 bytes per group of 32 (scale, zero) + 16 per layer (rounding state)
    assert q.weights == int8 + 5 * int8 // 32 + 16 * 14 + 4 * regular + ROPE_BUFFERS
    assert q.optimizer_states == e.optimizer_states  # float states, the same shapes as for float weights
    assert q.gradients == 4 * 64 * 32  # layer-wise: the largest single gradient (float_grad of gate/up/down)


@pytest.mark.parametrize("options", [{"optimizer": "adamw"}, {"optimizer": "galore", "rank": 4},
                                     {"optimizer": "apollo_mini", "weight_quant": True, "weight_group_size": 32,
                                      "layerwise": True, "stochastic_round": True}])
def test_estimate_matches_the_measured_cpu_peak(options):
    estimated = _estimate(**options).total
    measured = memory.measure(TINY, batch_size=2, max_length=16, dtype="float32", **options)
    assert abs(measured - estimated) < 0.01 * estimated, (measured, estimated)


def test_7b_q_apollo_mini_layerwise_fits_in_12_gb():
    common = dict(optimizer="apollo_mini", rank=1, batch_size=1, max_length=256, weight_quant=True,
                  weight_group_size=128, layerwise=True, stochastic_round=True, dtype="bfloat16")
    config = REPO_ROOT / "configs" / "llama_7b.json"
    published = memory.estimate(config, state_dtype="param", **common)  # bf16 states, as in the paper
    ours = memory.estimate(config, **common)  # the harness default: float32 states
    assert published.total < ours.total < 12e9
    assert 7.2e9 < published.weights < 7.3e9  # 6.48 G int8 + 0.25 G scales/zeros + 0.52 G bf16 embeddings
    assert published.gradients < 0.3e9


def test_cli_prints_every_term(capsys):
    code = memory.main(["--model_config", str(REPO_ROOT / "configs" / "llama_9m.json"), "--optimizer", "apollo_mini",
                        "--weight_quant", "--layerwise", "--max_length", "64"])
    out = capsys.readouterr().out
    assert code == 0
    for term in ("weights", "gradients", "optimizer states", "activations", "update scratch", "total (peak)"):
        assert f"  {term}" in out and " GB" in out


@pytest.mark.parametrize("argv,message", [
    (["--model_config", "configs/nope.json"], "error: model config configs/nope.json: cannot read a json file"),
    (["--optimizer", "sgd"], "error: unknown optimizer 'sgd'"),
    (["--weight_quant", "--weight_group_size", "100"], "not divisible by group_size 100"),
    (["--weight_quant", "--weight_bits", "4"], "only 8-bit weights are supported"),
    (["--optimizer", "apollo", "--rank", "128"], "rank 128 must be smaller than both dimensions"),
    (["--batch_size", "0"], "error: --batch_size must be a positive integer, got 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    if "--model_config" not in argv:
        argv = ["--model_config", str(REPO_ROOT / "configs" / "llama_9m.json"), *argv]
    assert memory.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
