"""Is the data loader fast enough? Loader throughput, json streaming vs pretokenized shards, beside model rates.

Measures the training pipeline of `train.data.build_train_loader` with 0, 1 and 2 DataLoader workers on
both data formats: `text` (read the json shards, shuffle, tokenise, pad, batch) and `tokens` (the
memory-mapped shards of `python -m train.pretokenize`, same shuffle, pad and batch): the seconds to
the first batch, then rows/s, tokens/s and positions/s (rows x max_length, what a model step consumes)
over the following batches. Beside them: the rate at which
LLaMA 9m/20m/60m consume positions in a float32 training step on this machine, and a derived A100 rate
of LLaMA-60M (no GPU measured here: 6 x matmul parameters + 12 x layers x seq x hidden FLOPs per token
at a stated MFU of the A100's 312 TFLOP/s bf16 dense peak). The loader is fast enough when its
positions/s exceed the model's.

    python benchmarks/loader_throughput.py                       # the figures in docs/performance.md
    python benchmarks/loader_throughput.py --token_dir data/c4-t5 --workers 0 4 --models 60m --device cuda

Without --token_dir the json folder is pretokenized into a temporary folder first (its rate is printed).
The rates include the epoch boundaries the timed batches cross (a new pass starts new workers and
refills the buffer), as training would. `--copies N` (default 32) reads
every train shard N times, as N shards of its own (symlinks, in a temporary folder), so that an epoch is
N times longer and up to N workers have a shard to read; the local sample is a single shard.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from train import pretokenize
from train.data import build_train_loader, load_tokenizer
from train.model import build_model, load_llama_config

REPO_ROOT = Path(__file__).resolve().parent.parent
A100_BF16_PEAK = 312e12  # FLOP/s, dense bfloat16 tensor cores (NVIDIA A100 datasheet)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = REPO_ROOT.parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(shared / "c4"), help="folder of c4-train.*.json.gz shards")
    parser.add_argument("--token_dir", help="pretokenized folder (default: pretokenize --data_dir into a temporary one)")
    parser.add_argument("--tokenizer", default=str(shared / "t5-base"), help="hub name or local folder")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="rows per loader batch")
    parser.add_argument("--packing", action="store_true", help="pack documents into full rows (default: pad)")
    parser.add_argument("--shuffle_buffer", type=int, default=1000,
                        help="documents in the shuffle buffer (the trainer's is 10,000; smaller here, so that the "
                             "timed batches need new documents rather than emptying a buffer that holds the sample)")
    parser.add_argument("--batches", type=int, default=60, help="json-path batches timed per worker count")
    parser.add_argument("--token_batches", type=int, default=400, help="token-path batches timed per worker count")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="worker counts (none: skip)")
    parser.add_argument("--formats", nargs="*", default=["text", "tokens"], choices=["text", "tokens"])
    parser.add_argument("--models", nargs="*", default=["9m", "20m", "60m"], help="configs (none: skip)")
    parser.add_argument("--model_batch", type=int, default=8, help="rows per model step")
    parser.add_argument("--model_steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation of the derived A100 rate")
    parser.add_argument("--copies", type=int, default=32, help="read each train shard as this many shards (1: as is)")
    return parser.parse_args(argv)


def loader_rate(args, tokenizer, data_dir: str, workers: int, batches: int) -> dict[str, float]:
    """Seconds to the first batch (build, start workers, fill the shuffle buffer), then the rates over the
    following `batches`: rows/s, non-pad tokens/s and row positions (rows x max_length)/s."""
    start = time.perf_counter()
    loader = build_train_loader(
        tokenizer=tokenizer, data_dir=data_dir, max_length=args.max_length, batch_size=args.batch_size,
        workers=workers, packing=args.packing, shuffle_buffer=args.shuffle_buffer,
    )
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    tokens = sum(int(next(iterator)["attention_mask"].sum()) for _ in range(batches))
    seconds = time.perf_counter() - first
    rows = batches * args.batch_size
    return {"first": first - start, "rows": rows / seconds, "tokens": tokens / seconds,
            "positions": rows * args.max_length / seconds}


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


def training_flops_per_token(config_path: Path, seq: int) -> tuple[float, int]:
    """(FLOPs per trained token, matmul parameters): 6 x matmul parameters + 12 x layers x seq x hidden.

    Matmul parameters: the attention and MLP weights and the output head (the input embedding is a
    lookup); 12 L T d are the attention score and value products, forward and backward.
    """
    c = json.loads(Path(config_path).read_text())
    d, layers = c["hidden_size"], c["num_hidden_layers"]
    kv = d * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * c["intermediate_size"]
    matmul = layers * per_layer + d * c["vocab_size"]
    return 6 * matmul + 12 * layers * seq * d, matmul


def replicate_json(data_dir: Path, copies: int, out: Path) -> Path:
    """A json folder whose train split is `copies` symlinked copies of every train shard (validation as is)."""
    out.mkdir()
    sources = sorted(data_dir.glob("c4-train.*.json.gz"))
    total = len(sources) * copies
    for number, source in enumerate(source for source in sources for _ in range(copies)):
        (out / f"c4-train.{number:05d}-of-{total:05d}.json.gz").symlink_to(source.resolve())
    for source in data_dir.glob("c4-validation.*.json.gz"):
        (out / source.name).symlink_to(source.resolve())
    return out


def replicate_tokens(token_dir: Path, copies: int, out: Path) -> Path:
    """The same for a token folder: every train token shard listed `copies` times under new names."""
    (out / "train").mkdir(parents=True)
    (out / "validation").symlink_to((token_dir / "validation").resolve())
    index = json.loads((token_dir / "train" / "index.json").read_text())
    shards = []
    for copy in range(copies):
        for shard in index["shards"]:
            name = f"{shard['name']}-copy{copy}"
            for suffix in (".tokens", ".offsets.npy", ".text_bytes.npy"):
                (out / "train" / f"{name}{suffix}").symlink_to((token_dir / "train" / f"{shard['name']}{suffix}").resolve())
            shards.append({**shard, "name": name})
    totals = {key: copies * index[key] for key in ("documents", "tokens", "text_bytes")}
    (out / "train" / "index.json").write_text(json.dumps({**index, **totals, "shards": shards}))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    with tempfile.TemporaryDirectory() as scratch:
        token_dir = args.token_dir
        if "tokens" in args.formats and token_dir is None:
            token_dir = str(Path(scratch) / "tokens")
            start = time.perf_counter()
            if pretokenize.main(["--data_dir", args.data_dir, "--tokenizer", args.tokenizer, "--out", token_dir]) != 0:
                raise SystemExit(2)
            seconds = time.perf_counter() - start
            indexes = [json.loads((Path(token_dir) / split / "index.json").read_text()) for split in ("train", "validation")]
            print(f"pretokenize (one process, both splits): {sum(i['tokens'] for i in indexes) / seconds:,.0f} tokens/s "
                  f"({sum(i['documents'] for i in indexes) / seconds:,.0f} documents/s)")
        json_dir = args.data_dir
        if args.copies > 1:
            json_dir = str(replicate_json(Path(args.data_dir), args.copies, Path(scratch) / "json"))
            if "tokens" in args.formats:
                token_dir = str(replicate_tokens(Path(token_dir), args.copies, Path(scratch) / "tokens-copies"))
        rows = "packed" if args.packing else "padded"
        print(f"loader: max_length {args.max_length}, batch {args.batch_size}, {rows} rows; "
              f"{args.batches} json / {args.token_batches} token batches; train shards read {args.copies}x")
        print(f"{'format':>7} {'workers':>8} {'first batch s':>14} {'rows/s':>10} {'tokens/s':>12} {'positions/s':>12}")
        for data_format in args.formats:
            data_dir, batches = (json_dir, args.batches) if data_format == "text" else (token_dir, args.token_batches)
            for workers in args.workers:
                rate = loader_rate(args, tokenizer, data_dir, workers, batches)
                print(f"{data_format:>7} {workers:>8} {rate['first']:>14.1f} {rate['rows']:>10,.0f} "
                      f"{rate['tokens']:>12,.0f} {rate['positions']:>12,.0f}")
    flops, matmul = training_flops_per_token(REPO_ROOT / "configs" / "llama_60m.json", args.max_length)
    print(f"derived A100 rate, LLaMA-60M at seq {args.max_length}: {matmul / 1e6:.1f}M matmul parameters, "
          f"{flops / 1e6:.1f} MFLOPs per token; {A100_BF16_PEAK / flops:,.0f} tokens/s at 100% of 312 TFLOP/s, "
          f"{args.mfu * A100_BF16_PEAK / flops:,.0f} at {args.mfu:.0%} MFU")
    if args.models:
        print(f"model: float32 forward+backward+AdamW, batch {args.model_batch} x {args.max_length}")
        print(f"{'model':>8} {'positions/s':>12}")
    for name in args.models:
        print(f"{name:>8} {model_rate(args, name):>12,.0f}")


if __name__ == "__main__":
    main()
