"""train.memory for every registered optimizer: the planner, the terms of the peak, FSDP2's per-rank state.

The planner's batch is the largest whose estimate fits; the printed terms (train.memory and the trainer's dry
run) add up to the printed total; the sharded state estimate equals what 2-process FSDP2 holds per rank.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig

import apollo
from train import memory
from train.optimizer_flags import MODES

REPO_ROOT = Path(__file__).resolve().parents[2]
# V = 97 rows split 49 + 48 over 2 ranks (uneven), GQA k/v 16 x 32, MLP 64 x 32 and 32 x 64
TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# every state layout that shards: AdamW's moments, APOLLO's row-split (tall) and whole (wide) moments, GaLore's
# and Fira's stored projections, SCALE's lm_head momentum, Muon's momentum, Adam-mini's per-head and per-row v
FSDP_OPTIMIZERS = ["adamw", "apollo", "galore", "fira", "scale", "muon", "adam_mini"]
LOW_RANK_OPTION = {name: 3 for name in memory.LOW_RANK}


# ------------------------------------------------------------------------------------ the planner


def test_largest_batch_fits_and_the_next_does_not():
    """Against the public estimator, built afresh: b fits, b + 1 does not (several optimizers and modes)."""
    config = REPO_ROOT / "configs" / "llama_60m.json"
    gpu = 2e9
    rows = memory.plan(config, gpu, max_length=256, optimizers=["adamw", "apollo_mini"],
                       modes=["plain", "int8 weights", "activation checkpointing"])
    checked = 0
    for row in rows:
        if row.batch is None:
            continue
        flags = memory.PLANNER_MODES[row.mode]
        common = dict(optimizer=row.optimizer, max_length=256, stochastic_round=flags.get("weight_quant", False), **flags)
        assert row.batch >= 1, row
        fits = memory.estimate(config, batch_size=row.batch, **common).total
        over = memory.estimate(config, batch_size=row.batch + 1, **common).total
        assert fits <= gpu < over, (row, fits, over)
        assert row.peak == fits and row.headroom == gpu - fits
        checked += 1
    assert checked == 5  # 2 optimizers x 3 modes, less AdamW with int8 weights
    refused = {(row.optimizer, row.mode): row.note for row in rows if row.batch is None}
    assert refused == {("adamw", "int8 weights"): MODES["weight_quant"]["adamw"]}
    ratios = {(row.optimizer, row.mode): row.ratio for row in rows}
    assert ratios[("adamw", "plain")] == 1.0
    apollo_mini = next(row for row in rows if row.optimizer == "apollo_mini" and row.mode == "int8 weights")
    assert "AdamW plain" in apollo_mini.note  # AdamW cannot run int8 weights: the ratio is to its plain batch


def test_planner_knows_every_registered_optimizer_and_refuses_as_the_trainer_does():
    rows = memory.plan(REPO_ROOT / "configs" / "llama_9m.json", 1e9, max_length=64, world_size=2)
    names = {row.optimizer for row in rows}
    assert names == set(apollo.optimizer_names())
    by_key = {(row.optimizer, row.mode): row for row in rows}
    assert len(by_key) == len(names) * len(memory.PLANNER_MODES)
    for name in names:
        assert by_key[(name, "layer-wise")].batch is None  # several processes: no layer-wise updates
        for mode, flag in (("int8 weights", "weight_quant"),):
            row = by_key[(name, mode)]
            assert (row.batch is None) == (name in MODES[flag]), row
        assert by_key[(name, "plain")].batch > 0


def test_parse_bytes():
    assert memory.parse_bytes("80GB") == 80e9 and memory.parse_bytes("80GiB") == 80 * 2**30
    assert memory.parse_bytes("24") == 24e9 and memory.parse_bytes("1e9B") == 1e9
    with pytest.raises(ValueError, match="--gpu_memory must look like 80GB"):
        memory.parse_bytes("lots")


def test_planner_cli_prints_one_row_per_optimizer_and_mode(capsys):
    assert memory.main(["--model_config", str(REPO_ROOT / "configs" / "llama_9m.json"), "--gpu_memory", "1GB",
                        "--max_batch", "--max_length", "64", "--optimizers", "adamw,apollo_mini,soap"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["optimizer", "mode"]
    assert len(out) == 2 + 3 * 4
    assert any(line.startswith("soap") and "refused" in line and MODES["weight_quant"]["soap"] in line for line in out)


def test_optimizer_help_lists_every_name():
    help_text = memory.build_parser().format_help()
    for name in apollo.optimizer_names():
        assert name in help_text


# ------------------------------------------------------------------------------- terms of the peak


@pytest.mark.parametrize("settings", [
    dict(optimizer="apollo_mini", world_size=4, gradient_accumulation=8),
    dict(optimizer="adamw", world_size=4, gradient_accumulation=8, ddp_bucket_view=False),
    dict(optimizer="muon", world_size=2, fsdp=True),
    dict(optimizer="scale", world_size=2, fsdp=True, gradient_accumulation=4),
    dict(optimizer="fira", weight_quant=True, layerwise=True, stochastic_round=True),
    dict(optimizer="soap", activation_checkpointing=True),
])
def test_breakdown_adds_up_to_the_total(settings):
    e = memory.estimate(REPO_ROOT / "configs" / "llama_9m.json", batch_size=2, max_length=64, **settings)
    assert sum(e.breakdown.values()) == e.total
    assert e.peak_phase in memory.PHASES and e.phases[e.peak_phase] == e.total == max(e.phases.values())
    assert e.breakdown["weights"] == e.weights and e.breakdown["optimizer states"] == e.optimizer_states
    assert ("DDP buckets" in e.breakdown) == (settings.get("world_size", 1) > 1 and not settings.get("fsdp"))


def test_bucket_views_remove_the_second_gradient_copy():
    """Plain DDP: buckets + a gradient per parameter (and, accumulating, from the first forward on);
    the harness's DDP: only the buckets and one gradient in flight."""
    common = dict(optimizer="apollo_mini", batch_size=1, max_length=256, world_size=4, gradient_accumulation=128)
    config = REPO_ROOT / "configs" / "llama_60m.json"
    lean = memory.estimate(config, **common)
    plain = memory.estimate(config, ddp_bucket_view=False, **common)
    static = memory.prepare(config, optimizer="apollo_mini", world_size=4, gradient_accumulation=128)
    biggest = max(item.grad for item in static.params)
    assert lean.ddp_buckets == plain.ddp_buckets == lean.gradients  # every (bf16) gradient once, in the buckets
    assert lean.breakdown.get("gradients", 0) <= biggest  # at most one gradient in flight
    assert plain.total - lean.total >= lean.gradients - biggest  # the second copy is gone


def test_dry_run_memory_line_adds_up(monkeypatch, capsys, tokenizer_dir, c4_dir):
    """The trainer's --dry_run: the 13B APOLLO-Mini DDP launch's flags (4 processes, accumulation 128) on 130M."""
    from train.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    argv = ["--model_config", str(REPO_ROOT / "configs" / "llama_130m.json"), "--optimizer", "apollo_mini", "--rank", "1",
            "--scale_type", "tensor", "--apollo_scale", "128", "--batch_size", "1", "--gradient_accumulation", "128",
            "--total_batch_size", "512", "--max_length", "256", "--dtype", "bfloat16", "--tokenizer", str(tokenizer_dir),
            "--data_dir", str(c4_dir), "--num_training_steps", "50", "--warmup_steps", "0", "--wandb", "disabled",
            "--dry_run"]
    assert main(argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory per process"))
    terms = dict((name.strip(), float(value)) for name, value in
                 re.findall(r"([a-zA-Z][a-zA-Z ]+?) (\d+\.\d+)(?= \+| =)", line.split(": ", 1)[1]))
    total = float(re.search(r"= (\d+\.\d+) GB", line).group(1))
    assert set(terms) >= {"weights", "optimizer states", "DDP buckets"}, line
    assert abs(sum(terms.values()) - total) <= 0.005 * len(terms), line
    phase = re.search(r"\(peak: ([a-z_ ]+)\)", line).group(1)
    assert phase in memory.PHASES
    expected = memory.estimate(REPO_ROOT / "configs" / "llama_130m.json", optimizer="apollo_mini", batch_size=1,
                               max_length=256, world_size=4, gradient_accumulation=128,
                               options={"rank": 1, "scale_type": "tensor", "scale": 128.0})
    assert total == round(expected.total / 1e9, 2)


# ------------------------------------------------------------------------- FSDP2 per-rank state bytes


def _fsdp_worker(rank, init_file, results):
    from train.distributed import Distributed, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = Distributed(rank, rank, 2, torch.device("cpu"))
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        measured = {}
        for name in FSDP_OPTIMIZERS:
            torch.manual_seed(0)
            model = memory.build(TINY, dtype="float32", device="cpu", weight_quant=False, weight_group_size=32)
            shard_model(model, ctx)
            opt = memory.optimizer_for(model, name, rank=LOW_RANK_OPTION.get(name),
                                       state_dtype=memory.resolve_state_dtype(name, None))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            measured[name] = apollo.optimizer_state_bytes(opt)
        results[rank] = measured
    finally:
        dist.destroy_process_group()


def test_sharded_state_bytes_in_closed_form():
    """AdamW: both moments split by rows (V = 97: 49 rows on rank 0, 48 on rank 1), step tensors whole;
    APOLLO rank 3: a tall weight's m x 3 moments split, a wide weight's 3 x n moments whole (2-process FSDP2
    agrees: the slow test below)."""
    model = memory.build(TINY, dtype="float32", device="meta", weight_quant=False, weight_group_size=32)
    adamw = memory.step_on_meta(model, "adamw", rank=None, state_dtype=None, p_dtype=torch.float32)
    rows = {0: 0, 1: 0}
    for param in model.parameters():
        for rank in rows:
            rows[rank] += 2 * 4 * memory.shard_rows(param.shape[0], 2, rank) * (param.numel() // param.shape[0]) + 4
    assert memory.sharded_state_bytes(adamw, 2, 0) == rows[0] and memory.sharded_state_bytes(adamw, 2, 1) == rows[1]
    assert rows[0] - rows[1] == 2 * 2 * 4 * 32  # the embedding's and lm_head's 49th row of both moments
    model = memory.build(TINY, dtype="float32", device="meta", weight_quant=False, weight_group_size=32)
    opt = memory.step_on_meta(model, "apollo", rank=3, state_dtype=None, p_dtype=torch.float32)
    gate = model.model.layers[0].mlp.gate_proj.weight  # 64 x 32: R = G P^T is 64 x 3, row-local
    down = model.model.layers[0].mlp.down_proj.weight  # 32 x 64: R = P^T G is 3 x 64, whole on every rank
    whole = apollo.optimizer_state_bytes(opt)
    for param, split in ((gate, True), (down, False)):
        moments = sum(v.numel() * 4 for v in opt.state[param].values() if torch.is_tensor(v) and v.dim() == 2)
        assert moments == 2 * 4 * (64 * 3 if split else 3 * 64)
    assert memory.sharded_state_bytes(opt, 1) == whole


@pytest.mark.slow
def test_sharded_state_estimate_equals_two_process_fsdp2(tmp_path):
    assert set(FSDP_OPTIMIZERS) | set(MODES["fsdp"]) | {"apollo_mini", "apollo_svd"} == set(apollo.optimizer_names())
    results = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for name in FSDP_OPTIMIZERS:
        model = memory.build(TINY, dtype="float32", device="meta", weight_quant=False, weight_group_size=32)
        opt = memory.step_on_meta(model, name, rank=LOW_RANK_OPTION.get(name),
                                  state_dtype=memory.resolve_state_dtype(name, None), p_dtype=torch.float32)
        for rank in (0, 1):
            assert memory.sharded_state_bytes(opt, 2, rank) == results[rank][name], (name, rank)
        whole = apollo.optimizer_state_bytes(opt)
        assert results[1][name] <= results[0][name] < whole, name  # rank 0 holds the 49-row halves
        e = memory.estimate(TINY, optimizer=name, rank=LOW_RANK_OPTION.get(name), dtype="float32", world_size=2,
                            fsdp=True, batch_size=1, max_length=8)
        assert e.optimizer_states == results[0][name]
