"""The one prepared device check: correctness, throughput, optimizer step and memory on a CUDA GPU, in one command.

    python benchmarks/gpu_check.py                      # full mode, CUDA: ~8 minutes on one H100/H200-class GPU
    python benchmarks/gpu_check.py --tiny               # the same code paths at toy sizes, any device (< 2 min on CPU)
    DATA_DIR=../shared/data/c4 TOKENIZER=../shared/data/t5-base python benchmarks/gpu_check.py

Writes `docs/gpu.md` (tables; `--out`) and a JSON of every figure (`--json`). Sections:
1. environment (torch, CUDA, GPU, memory);
2. correctness on the device: each optimizer of `apollo.optimizer_names()` for 3 steps on the same weights and
   gradients, on the device against float32 on the CPU, and fused against plain where the optimizer has both
   (relative difference of the weight change; float32 and bfloat16); then a tiny CLI run saved and resumed
   (local C4 shards and tokenizer from DATA_DIR / TOKENIZER; skipped, and said so, without them), bit-identical or
   the difference stated;
3. training throughput with synthetic token ids (uniform over the vocabulary; no data loader in the timing):
   LLaMA-60M and -130M, bf16, the published micro-batch, 30 timed updates per optimizer: tokens/s, MFU
   (6 N tokens/s over the GPU's dense bf16 peak), torch.cuda.max_memory_allocated beside train.memory's estimate;
   then eager against `--compile` (train.model.compile_layers: each decoder layer compiled) with AdamW at
   LLaMA-60M to -1B: tokens/s, MFU by torchtitan's FLOPs per token (train.model.flops_per_token), the first
   (compiling) update's seconds and the graphs compiled after it;
4. the optimizer step at 1B in the paper's Table 7 setting (seq 1024, batch 16; random gradients): ms of torch
   fused AdamW, APOLLO, APOLLO-Mini, GaLore and their projection refresh, as ratios to AdamW, and each low-rank
   optimizer again with its elementwise moment update compiled (elementwise="compiled", "[compiled]" rows);
5. memory: the 7B single-GPU recipe's code path (int8 weights, layer-wise APOLLO-Mini, bf16 states, micro-batch 1,
   synthetic ids) for 3 updates, its peak against 12 GB and the estimate; the largest LLaMA-1B micro-batch per
   optimizer (doubling until out of memory), as ratios to AdamW's.
Full mode first runs the tests marked `gpu` (`pytest -m gpu`). `--tiny` shrinks every size (the 9M config, toy
batches, a capped batch search, no pytest) so that tests/test_gpu_check.py runs it on the CPU and it cannot rot.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import apollo  # noqa: E402
from apollo.layerwise import LayerwiseOptimizer  # noqa: E402
from apollo.quant import quantize_model  # noqa: E402
from train.memory import GB, estimate  # noqa: E402
from train.metrics import default_peak_tflops  # noqa: E402
from train.model import build_model, compile_layers, compiled_graphs, flops_per_token  # noqa: E402

#: dense bf16 peak FLOP/s by GPU name (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
FULL = {"throughput": {"60m": 256, "130m": 128}, "compile": {"60m": 256, "130m": 128, "350m": 64, "1b": 32}, "seq": 256, "updates": 30, "step_model": "1b", "step_seq": 1024,
        "step_batch": 16, "memory_model": "7b", "search_model": "1b", "search_cap": 1024, "cli_updates": 20}
TINY = {"throughput": {"toy": 2}, "compile": {"toy": 2}, "seq": 32, "updates": 2, "step_model": "9m", "step_seq": 32, "step_batch": 2,
        "memory_model": "toy", "search_model": "toy", "search_cap": 4, "cli_updates": 4}
CORRECTNESS_CONFIG = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                      "tie_word_embeddings": False}
TOY = "toy"  # --tiny's model: CORRECTNESS_CONFIG, a few thousand parameters


def available_optimizers() -> list[str]:
    """Every registered optimizer whose optional packages (its spec's `requires`, e.g. bitsandbytes) are installed."""
    return [name for name in apollo.optimizer_names() if apollo.get_spec(name).available]


def model_config(size: str):
    """configs/llama_<size>.json, or the toy LlamaConfig of --tiny."""
    if size == TOY:
        from transformers import LlamaConfig

        return LlamaConfig(**CORRECTNESS_CONFIG)
    return REPO / "configs" / f"llama_{size}.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ 1. environment
def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / GB, 1), capability=f"{props.major}.{props.minor}")
    return info


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


# ------------------------------------------------------------------------------------------ 2. correctness
def _correctness_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CORRECTNESS_CONFIG)).to(device=device, dtype=dtype)


def _small_rank(name: str) -> dict:
    """The spec's smoke rank (the toy model's default rank would be a quarter of 64), without its short refresh gap:
    a projection redrawn on the device would differ from the CPU's draw."""
    return {k: v for k, v in apollo.get_spec(name).smoke_options.items() if k == "rank"}


def _three_steps(name: str, device, dtype, **options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Initial and final weights (float32, on the CPU) after 3 steps on seeded gradients."""
    model = _correctness_model(device, dtype)
    start = [p.detach().float().cpu().clone() for p in model.parameters()]
    optimizer = apollo.build_optimizer(name, model, lr=1e-3, weight_decay=0.01, **_small_rank(name), **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device=device, dtype=dtype)
        optimizer.step()
    return start, [p.detach().float().cpu() for p in model.parameters()]


def relative_change_difference(a: tuple, b: tuple) -> float:
    """||W_a - W_b|| / ||W_b - W_0|| over all parameters: how far two runs' updates differ, relative to the update."""
    (start, end_a), (_, end_b) = a, b
    diff = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(end_a, end_b)))
    change = math.sqrt(sum(float((y - s).double().square().sum()) for y, s in zip(end_b, start)))
    return diff / max(change, 1e-30)


def correctness(device: torch.device, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        reference = _three_steps(name, torch.device("cpu"), torch.float32)
        row = {"optimizer": name}
        for dtype in (torch.float32, torch.bfloat16):
            key = str(dtype).removeprefix("torch.")
            try:
                row[f"device vs cpu fp32 ({key})"] = relative_change_difference(_three_steps(name, device, dtype), reference)
                if "fused" in apollo.REGISTRY[name].options:
                    fused = _three_steps(name, device, dtype, fused=True)
                    row[f"fused vs plain ({key})"] = relative_change_difference(
                        fused, _three_steps(name, device, dtype, fused=False))
            except (RuntimeError, ValueError) as error:  # a refusal (e.g. a dtype an optimizer does not take)
                row[f"device vs cpu fp32 ({key})"] = f"refused: {str(error).splitlines()[0][:80]}"
        rows.append(row)
    return rows


def cli_resume(device: torch.device, updates: int, data_dir: str | None, tokenizer: str | None) -> dict:
    """A tiny `python -m train` run saved halfway and resumed: are the final weights bit-identical?"""
    if not (data_dir and tokenizer and Path(data_dir).is_dir() and Path(tokenizer).exists()):
        return {"result": "skipped: set DATA_DIR and TOKENIZER (local C4 shards and the t5-base tokenizer)"}
    from safetensors.torch import load_file
    from tests.train.test_cli import tiny_args

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        half = updates // 2
        argv = tiny_args(folder, Path(data_dir), Path(tokenizer), folder / "run", num_training_steps=updates,
                         save_every=half, eval_every=updates, optimizer="apollo", rank=4,  # the harness's namesake
                         update_proj_gap=2)
        from train.__main__ import main as train_main

        # in this process (deterministic cuBLAS is set in main() before CUDA starts); the trainer picks the device
        for extra in ([], ["--continue_from", str(folder / "run" / f"step_{half:07d}"), "--save_dir", str(folder / "resumed")]):
            if train_main([*argv, *extra]) != 0:
                return {"result": "failed: the training run exited non-zero (its error is printed above)"}
        final = f"step_{updates:07d}"
        a, b = load_file(folder / "run" / final / "model.safetensors"), load_file(folder / "resumed" / final / "model.safetensors")
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        return {"result": "bit-identical" if worst == 0.0 else f"differs: max |dW| {worst:.3g}", "updates": updates}


# ------------------------------------------------------------------------------------------ 3. throughput
def _timed_updates(model, optimizer, batch, updates: int, device) -> float:
    """Seconds per update (forward, backward, step, zero_grad) after one warm-up update."""
    for index in range(updates + 1):
        if index == 1:
            synchronize(device)
            start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (time.perf_counter() - start) / updates


def throughput(device: torch.device, names: list[str], sizes: dict[str, int], seq: int, updates: int) -> list[dict]:
    rows, peak = [], peak_flops(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for size, micro in sizes.items():
        config = model_config(size)
        for name in names:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = build_model(config, dtype=dtype, device=device)
            state_dtype = None if apollo.get_spec(name).states_follow_weights else "float32"
            options = {} if state_dtype is None else {"state_dtype": state_dtype}
            optimizer = apollo.build_optimizer(name, model, lr=1e-4, **options)
            batch = torch.randint(0, model.config.vocab_size, (micro, seq), device=device)
            seconds = _timed_updates(model, optimizer, batch, updates, device)
            params = sum(p.numel() for p in model.parameters())
            tokens_s = micro * seq / seconds
            measured = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
            predicted = estimate(config, optimizer=name, batch_size=micro, max_length=seq, dtype=dtype,
                                 state_dtype=state_dtype or "param", packing=True, device=device.type).total / GB
            rows.append({"model": size, "optimizer": name, "micro_batch": micro, "tokens_per_s": tokens_s,
                         "mfu": 6 * params * tokens_s / peak if peak else None, "max_allocated_gb": measured,
                         "estimate_gb": predicted})
            del model, optimizer, batch
    return rows


def _one_update(model, optimizer, batch, device) -> float:
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def compile_throughput(device: torch.device, sizes: dict[str, int], seq: int, updates: int) -> list[dict]:
    """Eager vs compiled decoder layers (AdamW, synthetic ids): tokens/s and MFU (6N + 12 L H d_head T FLOPs/token).

    Both models live side by side and their timed updates alternate (median per update), so that load on a
    shared machine hits both alike; the first update of each (the compiled one compiles) is timed apart.
    """
    rows = []
    peak = default_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    for size, micro in sizes.items():
        config = model_config(size)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        runs = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = build_model(config, dtype=dtype, device=device)
            params = sum(p.numel() for p in model.parameters())
            if mode == "compiled":
                compile_layers(model)
            runs[mode] = {"model": model, "optimizer": apollo.build_optimizer(apollo.BASELINE, model, lr=1e-4),
                          "times": []}
        batch = torch.randint(0, runs["eager"]["model"].config.vocab_size, (micro, seq), device=device)
        for mode, run in runs.items():
            run["first"] = _one_update(run["model"], run["optimizer"], batch, device)
        graphs = compiled_graphs()
        for _ in range(updates):
            for run in runs.values():
                run["times"].append(_one_update(run["model"], run["optimizer"], batch, device))
        flops = flops_per_token(runs["eager"]["model"].config, seq, params)
        for mode, run in runs.items():
            tokens_s = micro * seq / statistics.median(run["times"])
            rows.append({"model": size, "mode": mode, "micro_batch": micro, "tokens_per_s": tokens_s,
                         "mfu": flops * tokens_s / (peak * 1e12) if peak else None, "first_update_s": run["first"],
                         "graphs_after_first": compiled_graphs() - graphs if mode == "compiled" else None})
        rows[-1]["vs_eager"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
        del runs, batch
    return rows


# ------------------------------------------------------------------------------------------ 4. optimizer step
def optimizer_step(device: torch.device, size: str, updates: int) -> list[dict]:
    from benchmarks.optimizer_step import RANKS, build_parameters

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_parameters(size, dtype).to(device)
    for p in model.parameters():  # .to() keeps .grad only for same-device moves
        if p.grad is None:
            p.grad = torch.randn_like(p) * 1e-3
    rank = RANKS.get(size, max(1, model.config.hidden_size // 4))
    rows = []
    # The rows of the APOLLO paper's Table 7 at its settings (a published comparison this section reproduces, not
    # facts about the optimizers): the AdamW baseline, APOLLO and GaLore at rank r, APOLLO-Mini at its rank 1.
    table_7 = {apollo.BASELINE: {}, "apollo": {"rank": rank}, "apollo_mini": {}, "galore": {"rank": rank}}
    for name, options in table_7.items():
        spec = apollo.get_spec(name)
        refreshes = spec.refresh_option is not None
        for mode in ("default", "compiled") if spec.fused_low_rank else ("default",):
            if mode == "compiled":
                options = {**options, "elementwise": "compiled"}
            timings = {}
            for label, gap in (("step", 10**9), ("refresh", 1)):
                if not refreshes and label == "refresh":
                    continue
                extra = {spec.refresh_option: gap} if refreshes else {}
                optimizer = apollo.build_optimizer(name, model, lr=1e-5, **options, **extra)
                optimizer.step()  # the first step creates the state (and the first projection; compiles)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(updates):
                    optimizer.step()
                synchronize(device)
                timings[label] = 1e3 * (time.perf_counter() - start) / updates
                del optimizer
            rows.append({"optimizer": name if mode == "default" else f"{name} [compiled]", "step_ms": timings["step"],
                         "refresh_ms": timings.get("refresh")})
    adamw = rows[0]["step_ms"]
    for row in rows:
        row["vs_adamw"] = row["step_ms"] / adamw
    return rows


# ------------------------------------------------------------------------------------------ 5. memory
def single_gpu_recipe(device: torch.device, size: str, updates: int = 3) -> dict:
    """The 7B single-GPU recipe's path: int8 weights, layer-wise APOLLO-Mini, bf16 states, micro-batch 1."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = model_config(size)
    model = build_model(config, dtype=dtype, device=device)
    quantize_model(model, group_size=128 if size != TOY else 32, stochastic_round=True)
    optimizer = LayerwiseOptimizer(model, "apollo_mini", lr=1e-4)  # the published 7B recipe's optimizer
    batch = torch.randint(0, model.config.vocab_size, (1, min(256, model.config.max_position_embeddings)), device=device)
    _timed_updates(model, optimizer, batch, updates, device)
    predicted = estimate(config, optimizer="apollo_mini", batch_size=1, max_length=256, weight_quant=True, layerwise=True,
                         weight_group_size=128 if size != TOY else 32,
                         dtype=dtype, state_dtype="param", packing=True, stochastic_round=True, device=device.type).total
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer
    return {"model": size, "max_allocated_gb": measured / GB if measured else None, "estimate_gb": predicted / GB,
            "under_12gb": measured < 12 * GB if measured else None}


def largest_micro_batch(device: torch.device, names: list[str], size: str, cap: int, seq: int = 256) -> list[dict]:
    """Per optimizer: double the micro-batch from 1 until an update runs out of memory (or `cap` is reached)."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    rows = []
    for name in names:
        model = build_model(model_config(size), dtype=dtype, device=device)
        seq = min(seq, model.config.max_position_embeddings)
        optimizer = apollo.build_optimizer(name, model, lr=1e-5)
        batch, fits = 1, 0
        while batch <= cap:
            try:
                ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
                _timed_updates(model, optimizer, ids, 1, device)
                fits, batch = batch, batch * 2
            except torch.OutOfMemoryError:
                break
            finally:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append({"optimizer": name, "largest_micro_batch": fits, "capped": fits * 2 > cap})
        del model, optimizer
    adamw = next((r["largest_micro_batch"] for r in rows if r["optimizer"] == apollo.BASELINE), None)
    for row in rows:
        row["vs_adamw"] = row["largest_micro_batch"] / adamw if adamw else None
    return rows


# ------------------------------------------------------------------------------------------ the report
def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in rows]


def report(results: dict, tiny: bool) -> str:
    lines = ["# GPU check" + (" (tiny mode: toy sizes, not figures)" if tiny else ""), "",
             "Written by `python benchmarks/gpu_check.py" + (" --tiny" if tiny else "") + "` (measured).", "",
             "## Environment", "", *table([results["environment"]]), "",
             "## Correctness on the device (relative difference of the weight change after 3 steps)", "",
             *table(results["correctness"]), "", f"Tiny CLI run saved and resumed: {results['cli_resume']}", "",
             "## Training throughput (synthetic token ids)", "", *table(results["throughput"]), "",
             "Eager against compiled decoder layers (AdamW; MFU by 6N + 12 L H d_head T):", "",
             *table(results["compile_throughput"]), "",
             "## Optimizer step (random gradients)", "", *table(results["optimizer_step"]), "",
             "## Memory", "", "Single-GPU recipe path (int8 weights, layer-wise APOLLO-Mini, micro-batch 1):", "",
             *table([results["single_gpu"]]), "", "Largest micro-batch (seq 256):", "",
             *table(results["micro_batch"]), ""]
    return "\n".join(lines)


def run(tiny: bool, device: torch.device, data_dir: str | None, tokenizer: str | None) -> dict:
    sizes = TINY if tiny else FULL
    names = available_optimizers()
    results = {"environment": environment(device), "mode": "tiny" if tiny else "full"}
    sections = [
        ("correctness", lambda: correctness(device, names)),
        ("cli_resume", lambda: cli_resume(device, sizes["cli_updates"], data_dir, tokenizer)),
        ("throughput", lambda: throughput(device, names, sizes["throughput"], sizes["seq"], sizes["updates"])),
        ("compile_throughput", lambda: compile_throughput(device, sizes["compile"], sizes["seq"], sizes["updates"])),
        ("optimizer_step", lambda: optimizer_step(device, sizes["step_model"], sizes["updates"])),
        ("single_gpu", lambda: single_gpu_recipe(device, sizes["memory_model"])),
        ("micro_batch", lambda: largest_micro_batch(device, names, sizes["search_model"], sizes["search_cap"])),
    ]
    for key, section in sections:
        start = time.perf_counter()
        results[key] = section()
        print(f"{key}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on any device (the test's mode)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(REPO / "docs" / "gpu.md"), help="markdown report")
    parser.add_argument("--json", default=None, help="JSON of every figure (default: the report's path with .json)")
    parser.add_argument("--skip_pytest", action="store_true", help="full mode: do not run the tests marked gpu first")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.tiny and device.type != "cuda":
        print("error: full mode needs a CUDA device; use --tiny to run the same code paths at toy sizes", file=sys.stderr)
        return 2
    if not args.tiny and not args.skip_pytest:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=REPO)
        if tests.returncode not in (0, 5):
            print(f"error: the tests marked gpu failed (exit {tests.returncode}); fix them before measuring", file=sys.stderr)
            return 1
    results = run(args.tiny, device, os.environ.get("DATA_DIR"), os.environ.get("TOKENIZER"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, args.tiny))
    Path(args.json or out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(report(results, args.tiny))
    return 0


if __name__ == "__main__":
    sys.exit(main())
