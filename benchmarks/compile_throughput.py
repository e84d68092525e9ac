"""Eager against `--compile` (each decoder layer compiled) on this machine: tokens/s, MFU, first-update seconds.

    python benchmarks/compile_throughput.py --models 20m 60m --batch_size 8 --seq 256 --updates 3

AdamW on synthetic token ids (no data loader in the timing), float32 on a CPU and bfloat16 on a GPU; the
same function as benchmarks/gpu_check.py's section (train.model.compile_layers, train.model.flops_per_token).
MFU needs a known peak (--peak_tflops, or a GPU's name): on a CPU it is '-'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["20m", "60m"], help="configs/llama_<size>.json")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--updates", type=int, default=3, help="timed updates after the first (compiling) one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    for size in args.models:
        if not (gpu_check.REPO / "configs" / f"llama_{size}.json").exists():
            parser.error(f"no configs/llama_{size}.json")
    if min(args.batch_size, args.seq, args.updates) < 1:
        parser.error("--batch_size, --seq and --updates must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = gpu_check.compile_throughput(device, {size: args.batch_size for size in args.models}, args.seq, args.updates)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq}\n")
    print("\n".join(gpu_check.table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
