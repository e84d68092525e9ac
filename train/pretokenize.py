"""`python -m train.pretokenize`: tokenise C4 once into memory-mapped token shards for `--data_format tokens`.

    python -m train.pretokenize --data_dir ../shared/data/c4 --tokenizer t5-base --out data/c4-t5 [--split train]
    python -m train --data_dir data/c4-t5 ...          # detected from the folder (or --data_format tokens)

One token shard per source json.gz file, documents in file order, each tokenised whole exactly as the
streaming loader tokenises it (t5 appends `</s>`); the layout and index are described in
train/token_shards.py. Without --split both splits are written; validation also gets per-token byte
ends, so that evaluation can count the UTF-8 bytes behind truncated documents (bits per byte).
A split is complete once its index.json exists (written last); an existing split is never overwritten.
Bad arguments exit 2 with one line.
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from train.data import SHARD_PATTERNS, load_tokenizer
from train.token_shards import (FORMAT, INDEX_NAME, SPLITS, VERSION, byte_ends, special_tokens, text_bytes,
                                token_dtype)

DOCUMENTS_PER_CALL = 512  # documents per tokenizer call


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.pretokenize", description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="folder of C4 shards (c4-train.*.json.gz, c4-validation.*.json.gz)")
    parser.add_argument("--tokenizer", default="t5-base", help="tokenizer name or local folder (default t5-base)")
    parser.add_argument("--out", required=True, help="token folder to write: OUT/train, OUT/validation")
    parser.add_argument("--split", choices=SPLITS, help="write only this split (default: both)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one source file each at a time (default 1)")
    return parser.parse_args(argv)


def _sources(data_dir: Path, split: str) -> list[Path]:
    files = sorted(data_dir.glob(SHARD_PATTERNS[split]))  # the order open_c4 reads them in
    if not files:
        raise ValueError(f"--data_dir {data_dir}: no shards matching {SHARD_PATTERNS[split]}")
    return files


def _texts(source: Path) -> list[str]:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{source}: line {number} has no text field")
    return [row["text"] for row in rows]


_TOKENIZER: Any = None


def _load(name: str) -> None:
    global _TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _TOKENIZER = load_tokenizer(name)


def write_shard(source: Path, folder: Path, dtype: str, with_byte_ends: bool) -> dict[str, Any]:
    """Tokenise one source file into folder/<name>.*; returns its index entry. Files appear complete or not at all."""
    start_time = time.perf_counter()
    name = source.name.removesuffix(".json.gz")
    texts = _texts(source)
    offsets, whole = [0], []
    paths = {kind: folder / f"{name}.{kind}" for kind in ("tokens", "byte_ends")}
    with ExitStack() as files:
        tokens_file = files.enter_context(open(f"{paths['tokens']}.part", "wb"))
        ends_file = files.enter_context(open(f"{paths['byte_ends']}.part", "wb")) if with_byte_ends else None
        for first in range(0, len(texts), DOCUMENTS_PER_CALL):
            chunk = texts[first : first + DOCUMENTS_PER_CALL]
            encoded = _TOKENIZER(chunk, return_offsets_mapping=with_byte_ends, verbose=False)
            for number, (text, ids) in enumerate(zip(chunk, encoded["input_ids"])):
                np.asarray(ids, dtype=dtype).tofile(tokens_file)
                offsets.append(offsets[-1] + len(ids))
                whole.append(text_bytes(text))
                if with_byte_ends:
                    byte_ends(text, encoded["offset_mapping"][number]).tofile(ends_file)
    np.save(folder / f"{name}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(folder / f"{name}.text_bytes.npy", np.asarray(whole, dtype=np.int64))
    for kind, path in paths.items():
        if kind == "tokens" or with_byte_ends:
            os.replace(f"{path}.part", path)
    seconds = time.perf_counter() - start_time
    print(f"{folder.name}/{name}: {len(texts):,} documents, {offsets[-1]:,} tokens ({seconds:.1f} s)", flush=True)
    return {"name": name, "source": str(source.resolve()), "documents": len(texts), "tokens": offsets[-1],
            "text_bytes": int(sum(whole))}


def write_split(data_dir: Path, tokenizer_name: str, out: Path, split: str, workers: int) -> dict[str, Any]:
    """Every source file of `split` -> out/split/, then its index.json."""
    sources = _sources(data_dir, split)
    folder = out / split
    if (folder / INDEX_NAME).exists():
        raise ValueError(f"--out {out}: {split}/{INDEX_NAME} exists already; remove {folder} or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _TOKENIZER
    dtype = token_dtype(len(tokenizer))
    with_byte_ends = split == "validation"
    jobs = [(source, folder, dtype, with_byte_ends) for source in sources]
    if workers > 1 and len(jobs) > 1:
        # spawn: a forked copy of a tokenizer that has run already can deadlock (tokenizers' own warning)
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(jobs)), initializer=_load, initargs=(tokenizer_name,)) as pool:
            shards = pool.starmap(write_shard, jobs)
    else:
        shards = [write_shard(*job) for job in jobs]
    prefix, suffix = special_tokens(tokenizer)
    index = {
        "format": FORMAT, "version": VERSION, "split": split,
        "tokenizer": tokenizer_name, "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer), "dtype": dtype,
        "special": {"prefix": prefix, "suffix": suffix, "pad_token_id": tokenizer.pad_token_id,
                    "eos_token_id": tokenizer.eos_token_id},
        "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "text_bytes": sum(s["text_bytes"] for s in shards), "byte_ends": with_byte_ends,
        "shards": shards,
    }
    (folder / f"{INDEX_NAME}.part").write_text(json.dumps(index, indent=1) + "\n")
    os.replace(folder / f"{INDEX_NAME}.part", folder / INDEX_NAME)
    return index


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir, out = Path(args.data_dir), Path(args.out)
    splits = [args.split] if args.split else list(SPLITS)
    try:
        if not data_dir.is_dir():
            raise ValueError(f"--data_dir {data_dir}: no such folder")
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: must be at least 1")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: is a file, not a folder")
        for split in splits:
            _sources(data_dir, split)
            if (out / split / INDEX_NAME).exists():
                raise ValueError(f"--out {out}: {split}/{INDEX_NAME} exists already; remove {out / split} or choose another --out")
        try:
            _load(args.tokenizer)
        except ValueError as error:
            raise ValueError(f"--tokenizer: {error}") from None
        for split in splits:
            index = write_split(data_dir, args.tokenizer, out, split, args.workers)
            print(f"{out / split}: {index['documents']:,} documents, {index['tokens']:,} tokens ({index['dtype']}), "
                  f"{len(index['shards'])} shard{'s' if len(index['shards']) > 1 else ''}", flush=True)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
