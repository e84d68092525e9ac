"""--compile, MFU and tokens/s: compiled losses equal eager's, a compiled run resumes bit-identically, recompiles count.

Inductor's C++ backend compiles the tiny model's layer once per process (seconds with a warm cache); the
runs share this process, so later runs reuse the graph. The compile cache lives in pytest's cache folder
so CI can keep it between runs.
"""
import os

import pytest
import torch
from transformers import LlamaConfig

from tests.train.test_cli import TINY_LLAMA, read_metrics, tiny_args, weights
from train import __main__ as cli
from train.metrics import default_peak_tflops, speed_metrics
from train.model import build_model, compile_layers, compiled_graphs, flops_per_token, parameter_counts


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(request, tmp_path_factory):
    """A persistent inductor cache (pytest's cache folder) for this module's compiles; a fresh folder when
    pytest runs without its cache plugin (-p no:cacheprovider)."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("inductor") if cache is not None else tmp_path_factory.mktemp("inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def runs(tmp_path_factory, c4_dir, tokenizer_dir):
    """Eager and compiled 6-update runs of the same config (checkpoints at 3 and 6), MFU against a 1 TFLOP/s peak."""
    folder = tmp_path_factory.mktemp("compile")
    result = {}
    for name, flags in (("eager", {}), ("compiled", {"compile": True})):
        argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / name, peak_tflops=1.0, **flags)
        assert cli.main(argv) == 0
        result[name] = {"run": folder / name, "argv": argv}
    return result


def train_records(run):
    return [r for r in read_metrics(run) if "loss" in r]


def test_compiled_losses_equal_eager_within_round_off(runs):
    eager, compiled = train_records(runs["eager"]["run"]), train_records(runs["compiled"]["run"])
    assert [r["step"] for r in compiled] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5, abs=0)
    assert compiled[0]["compile/graphs"] >= 1 and compiled[0]["compile/first_update_seconds"] > 0
    assert all(r["compile/recompiles"] == 0 for r in compiled)  # fixed shapes: nothing recompiles per batch
    assert "compile/recompiles" not in eager[0]


def test_compiled_run_resumes_bit_identically(runs):
    """Resume the compiled run at update 3 into a compiled run: update 6's weights equal the uninterrupted run's."""
    original = runs["compiled"]["run"]
    resumed = original.parent / "compiled_resumed"
    argv = runs["compiled"]["argv"] + ["--continue_from", str(original / "step_0000003"), "--save_dir", str(resumed)]
    assert cli.main(argv) == 0
    expected, got = weights(original / "step_0000006"), weights(resumed / "step_0000006")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    losses = lambda run: [(r["step"], r["loss"]) for r in train_records(run) if r["step"] > 3]
    assert losses(resumed) == losses(original)


def test_mfu_and_tokens_per_second_in_every_log(runs):
    """MFU = FLOPs/token x positions / s / peak; positions per update = 4 x 32, tokens = the update's non-pad tokens."""
    config = LlamaConfig.from_dict(TINY_LLAMA)
    params = parameter_counts(build_model(config, device="meta"))["total"]
    flops = flops_per_token(config, 32, params)
    records = train_records(runs["eager"]["run"])
    previous = 0
    for record in records:
        tokens, previous = record["tokens_seen"] - previous, record["tokens_seen"]
        assert record["tokens_per_s_per_process"] == pytest.approx(record["throughput_tokens"], rel=1e-12)
        expected = flops * record["tokens_per_s_per_process"] * (4 * 32) / tokens / 1e12
        assert record["mfu"] == pytest.approx(expected, rel=1e-9)


def test_flops_per_token_is_torchtitans_formula():
    """6 (N - V d) + 12 L H d_head T for the tiny config: N = 2,084,448, V d = 32128 x 32, L 2, H 2, d_head 16, T 32."""
    config = LlamaConfig.from_dict(TINY_LLAMA)
    params = parameter_counts(build_model(config, device="meta"))["total"]
    assert params == 32128 * 32 * 2 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    assert flops_per_token(config, 32, params) == 6 * (params - 32128 * 32) + 12 * 2 * 2 * 16 * 32


def test_speed_metrics_and_device_peaks():
    metrics = speed_metrics(tokens=1000, positions=2048, seconds=2.0, world_size=2, flops_per_token=10**9, peak_tflops=100.0)
    assert metrics == {"tokens_per_s_per_process": 250.0, "mfu": 10**9 * 2048 / 2 / 2.0 / 1e14}
    assert "mfu" not in speed_metrics(tokens=1, positions=1, seconds=1.0, world_size=1, flops_per_token=1, peak_tflops=None)
    assert default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert default_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert default_peak_tflops("cpu") is None


def test_a_new_shape_compiles_a_graph_and_a_repeat_does_not():
    torch.manual_seed(0)
    model = build_model(LlamaConfig.from_dict(TINY_LLAMA))
    assert compile_layers(model) == 2
    ids = torch.randint(2, 32000, (2, 16))
    model(input_ids=ids).loss  # noqa: B018  (compiles, or finds the graph from an earlier test)
    start = compiled_graphs()
    model(input_ids=ids)
    assert compiled_graphs() == start  # the same shape, both layers: no new graph
    model(input_ids=torch.randint(2, 32000, (3, 16)))
    assert compiled_graphs() == start + 1  # dynamic=False: a new batch size is a new graph
    assert set(model.state_dict()) == set(build_model(LlamaConfig.from_dict(TINY_LLAMA), device="meta").state_dict())


@pytest.mark.parametrize("flag", ["weight_quant", "layerwise"])
def test_compile_refuses_modes_it_does_not_trace(tmp_path, c4_dir, tokenizer_dir, capsys, flag):
    extra = {"optimizer": "apollo", "rank": 4, flag: True}
    if flag == "layerwise":
        extra["gradient_accumulation"] = 1
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", compile=True, **extra)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: --compile does not combine with --{flag}; drop one of them"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{"fsdp": True, "activation_checkpointing": True}, {}], ids=["fsdp+checkpointing", "ddp"])
def test_compiled_two_rank_run_equals_eager(tmp_path, c4_dir, tokenizer_dir, mode):
    """2 gloo ranks (FSDP2 with activation checkpointing, or DDP): compiled losses equal eager's within round-off."""
    from tests.train.test_cli import run_train

    losses = {}
    for name, flags in (("eager", {}), ("compiled", {"compile": True})):
        argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / name, num_training_steps=3, save_every=3,
                         eval_every=3, **mode, **flags)
        run_train(argv, nproc=2, timeout=900)
        losses[name] = [r["loss"] for r in train_records(tmp_path / name)]
    assert len(losses["compiled"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=0)
