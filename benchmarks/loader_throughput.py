"""Is the data loader fast enough? Loader throughput beside the token rate that small models consume.

Measures the full training pipeline of `train.data.build_train_loader` (read the json shards, shuffle,
tokenise, pad, batch) with 0, 1 and 2 DataLoader workers, as documents/s and tokens/s, and the rate at
which LLaMA 9m/20m/60m consume tokens in a float32 training step (forward + backward + AdamW) on this
machine. The loader is fast enough when its rows x max_length per second exceed the model's.

    python benchmarks/loader_throughput.py                       # the figures in docs/performance.md
    python benchmarks/loader_throughput.py --workers 0 4 --batches 200 --models 60m --device cuda

Loader timings include building the loader and starting workers (a new pass starts new workers), and
run across epoch boundaries when the data is small, as training would.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from train.data import build_train_loader, load_tokenizer
from train.model import build_model, load_llama_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    shared = REPO_ROOT.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(shared / "c4"), help="folder of c4-train.*.json.gz shards")
    parser.add_argument("--tokenizer", default=str(shared / "t5-base"), help="hub name or local folder")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="rows per loader batch")
    parser.add_argument("--batches", type=int, default=60, help="loader batches timed per worker count")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="worker counts (none: skip)")
    parser.add_argument("--models", nargs="*", default=["9m", "20m", "60m"], help="configs (none: skip)")
    parser.add_argument("--model_batch", type=int, default=8, help="rows per model step")
    parser.add_argument("--model_steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def loader_rate(args, tokenizer, workers: int) -> dict[str, float]:
    """Documents/s, non-pad tokens/s and row positions (rows x max_length)/s of the whole pipeline."""
    start = time.perf_counter()
    loader = build_train_loader(
        tokenizer=tokenizer, data_dir=args.data_dir, max_length=args.max_length, batch_size=args.batch_size,
        workers=workers,
    )
    tokens = 0
    for index, batch in enumerate(loader):
        tokens += int(batch["attention_mask"].sum())
        if index + 1 == args.batches:
            break
    seconds = time.perf_counter() - start
    rows = args.batches * args.batch_size
    return {"docs": rows / seconds, "tokens": tokens / seconds, "positions": rows * args.max_length / seconds}


def model_rate(args, name: str) -> float:
    """Positions/s of float32 forward + backward + AdamW steps at (model_batch, max_length)."""
    torch.manual_seed(0)
    config = load_llama_config(REPO_ROOT / "configs" / f"llama_{name}.json")
    model = build_model(config, device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(1, config.vocab_size, (args.model_batch, args.max_length), device=args.device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, AdamW state creation
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.model_steps):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.model_steps * args.model_batch * args.max_length / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    print(f"loader: {args.data_dir}, max_length {args.max_length}, batch {args.batch_size}, {args.batches} batches")
    print(f"{'workers':>8} {'docs/s':>10} {'tokens/s':>12} {'positions/s':>12}")
    for workers in args.workers:
        rate = loader_rate(args, tokenizer, workers)
        print(f"{workers:>8} {rate['docs']:>10,.0f} {rate['tokens']:>12,.0f} {rate['positions']:>12,.0f}")
    print(f"model: float32 forward+backward+AdamW, batch {args.model_batch} x {args.max_length}")
    print(f"{'model':>8} {'positions/s':>12}")
    for name in args.models:
        print(f"{name:>8} {model_rate(args, name):>12,.0f}")


if __name__ == "__main__":
    main()
