"""Token shards: C4 tokenised once (`python -m train.pretokenize`), read back memory-mapped.

A token folder holds one sub-folder per split, and in it one token shard per C4 source file, with the
documents in file order:

    DIR/train/index.json                  what the split holds (below); written last, so a split
                                          without it is incomplete
    DIR/train/<name>.tokens               the shard's documents back to back: raw token ids, no header,
                                          dtype of the index (uint16 when the vocabulary fits, else uint32)
    DIR/train/<name>.offsets.npy          int64 (documents + 1,): document d is tokens[offsets[d]:offsets[d+1]]
    DIR/train/<name>.text_bytes.npy       int64 (documents,): UTF-8 bytes of each document's whole text
    DIR/validation/...                    the same, plus
    DIR/validation/<name>.byte_ends       uint32, one per token: UTF-8 bytes of the document's text up to
                                          the end of this token (running maximum; special tokens repeat
                                          the value before them), for bits per byte under truncation

`<name>` is the source file's name without `.json.gz` (c4-train.00000-of-01024). Every document is
tokenised whole, with the tokenizer's special tokens (t5: `</s>` at the end): documents are
separated by their own eos, and an index lists the special prefix/suffix ids it found.

index.json: {"format": "apollo-token-shards", "version": 1, "split", "tokenizer" (as given),
"tokenizer_class", "vocab_size" (len(tokenizer)), "dtype", "special": {"prefix": [ids],
"suffix": [ids], "pad_token_id", "eos_token_id"}, "documents", "tokens", "text_bytes", "byte_ends"
(bool), "shards": [{"name", "source" (absolute path of the json.gz), "documents", "tokens",
"text_bytes"}]}.

Reading: `open_tokens` is a datasets IterableDataset with one data source per token shard, like the
json shards of the streaming path, so datasets' own shard shuffle, rank split (split_dataset_by_node)
and worker split, and its resumable (shard, document) position, apply unchanged; the rows it yields
are the rows the streaming tokenisation yields (`truncate` = the tokenizer's own truncation).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

FORMAT, VERSION = "apollo-token-shards", 1
INDEX_NAME = "index.json"
SPLITS = ("train", "validation")
DTYPES = ("uint16", "uint32")


# ----------------------------------------------------------------------------- shared with the text path


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer adds around a text (t5: [], [1]; LLaMA: [bos], [])."""
    probe = "probe text"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"tokenizer {tokenizer.name_or_path}: cannot tell its special tokens from its text tokens")


def truncate(ids: list[int], max_length: int, suffix) -> list[int]:
    """The tokenizer's own truncation of a whole document: cut the text tokens, keep the special ones.

    `suffix`: the trailing special ids (t5: [1]); leading ones stay at the front anyway. A document of
    at most max_length ids is unchanged.
    """
    if len(ids) <= max_length:
        return ids
    return ids[: max_length - len(suffix)] + list(suffix)


def byte_ends(text: str, offsets) -> np.ndarray:
    """uint32 per token: UTF-8 bytes of `text` up to the end of that token (running maximum over tokens).

    `offsets` are the fast tokenizer's (start, end) character offsets (special tokens (0, 0)). A lone
    surrogate counts 3 bytes (as UTF-8 with surrogatepass writes it).
    """
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    prefix_bytes = np.concatenate([[0], np.cumsum(widths)])  # bytes of text[:c] for c = 0 .. len(text)
    ends = np.asarray([end for _, end in offsets], dtype=np.int64).reshape(-1)
    return np.maximum.accumulate(prefix_bytes[ends]).astype(np.uint32) if len(ends) else np.zeros(0, np.uint32)


def text_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def covered_bytes(kept: int, total: int, whole_bytes: int, ends, suffix_length: int) -> int:
    """UTF-8 bytes of the text a row of `kept` of the document's `total` ids covers: the whole text if
    the document was kept whole, else the text up to the end of its last kept text token (`ends`: the
    document's byte_ends). Whitespace after that token, which the next token would cover, is not counted."""
    if kept == total:
        return whole_bytes
    return int(ends[kept - suffix_length - 1])


# ----------------------------------------------------------------------------- reading


def split_folder(folder: str | Path, split: str) -> Path:
    return Path(folder) / split


def is_token_folder(folder: str | Path) -> bool:
    """A folder written by train.pretokenize: it has <split>/index.json (or is itself a split)."""
    path = Path(folder)
    return any((path / split / INDEX_NAME).is_file() for split in SPLITS) or (path / INDEX_NAME).is_file()


def read_index(folder: str | Path, split: str) -> dict[str, Any]:
    """The index of `split`, checked against the files (sizes only, nothing read); ValueError in one line."""
    path = Path(folder)
    where = f"token folder {path}"
    if (path / INDEX_NAME).is_file() and not (path / split).is_dir():
        raise ValueError(f"{where} is one split of a token folder: pass its parent folder {path.parent}")
    index_path = split_folder(path, split) / INDEX_NAME
    if not index_path.is_file():
        raise ValueError(f"{where}: no {split} split ({split}/{INDEX_NAME} missing; "
                         f"write it with python -m train.pretokenize --split {split} --out {path})")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: {split}/{INDEX_NAME} is not readable json ({error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{where}: {split}/{INDEX_NAME} is not a {FORMAT} version {VERSION} index")
    try:
        dtype, shards = index["dtype"], index["shards"]
        if dtype not in DTYPES or not shards:
            raise ValueError(f"dtype {dtype!r} or an empty shard list")
        if index["vocab_size"] > np.iinfo(dtype).max + 1:
            raise ValueError(f"vocab_size {index['vocab_size']} does not fit {dtype}")
        for shard in shards:
            _check_shard(split_folder(path, split), shard, dtype, index["byte_ends"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: {split}/{INDEX_NAME} lacks a field ({error})") from None
    except ValueError as error:
        raise ValueError(f"{where}: {split}: {error}") from None
    return index


def _check_shard(folder: Path, shard: dict, dtype: str, with_byte_ends: bool) -> None:
    name, documents, tokens = shard["name"], shard["documents"], shard["tokens"]
    sizes = {f"{name}.tokens": tokens * np.dtype(dtype).itemsize}
    if with_byte_ends:
        sizes[f"{name}.byte_ends"] = tokens * 4
    for file, size in sizes.items():
        if not (folder / file).is_file():
            raise ValueError(f"{file} is missing")
        if (folder / file).stat().st_size != size:
            raise ValueError(f"{file} has {(folder / file).stat().st_size} bytes, the index says {size}")
    for file, length in ((f"{name}.offsets.npy", documents + 1), (f"{name}.text_bytes.npy", documents)):
        try:
            array = np.load(folder / file, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ValueError(f"{file} is missing or unreadable ({error})") from None
        if array.shape != (length,):
            raise ValueError(f"{file} has shape {array.shape}, the index says ({length},)")


def check_token_folder(folder: str | Path) -> None:
    """Both splits present and consistent with their files; validation with byte ends. ValueError."""
    indexes = [read_index(folder, split) for split in SPLITS]
    if not indexes[1]["byte_ends"]:
        raise ValueError(f"token folder {folder}: validation has no byte ends (bits per byte); rewrite it with "
                         f"python -m train.pretokenize --split validation")
    if {k: indexes[0][k] for k in ("vocab_size", "special")} != {k: indexes[1][k] for k in ("vocab_size", "special")}:
        raise ValueError(f"token folder {folder}: train and validation were written with different tokenizers")


def check_tokenizer(index: dict[str, Any], tokenizer, folder: str | Path) -> None:
    """The run's tokenizer must be the one the shards were written with (vocab size and special ids)."""
    prefix, suffix = special_tokens(tokenizer)
    here = {"vocab_size": len(tokenizer), "prefix": prefix, "suffix": suffix,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    saved = {"vocab_size": index["vocab_size"], **index["special"]}
    if here != saved:
        raise ValueError(f"token folder {folder} was written with tokenizer {index['tokenizer']} ({saved}); "
                         f"this run's tokenizer {tokenizer.name_or_path} has {here}")


def _read_documents(shards: list[str], folder: str, dtype: str, suffix: tuple[int, ...], max_length: int | None,
                    with_bytes: bool) -> Iterator[dict[str, Any]]:
    """The documents of `shards` in file order: {"input_ids"} (+ {"text_bytes"} it covers)."""
    for name in shards:
        base = Path(folder) / name
        tokens = np.memmap(f"{base}.tokens", dtype=dtype, mode="r")
        offsets = np.load(f"{base}.offsets.npy").tolist()
        if with_bytes:
            whole = np.load(f"{base}.text_bytes.npy").tolist()
            ends = np.memmap(f"{base}.byte_ends", dtype=np.uint32, mode="r")
        for d in range(len(offsets) - 1):
            start, stop = offsets[d], offsets[d + 1]
            if max_length is None or stop - start <= max_length:
                row = tokens[start:stop].tolist()
            else:  # = truncate(), without reading the dropped ids
                row = tokens[start : start + max_length - len(suffix)].tolist() + list(suffix)
            if not with_bytes:
                yield {"input_ids": row}
            else:
                covered = covered_bytes(len(row), stop - start, whole[d], ends[start:stop], len(suffix))
                yield {"input_ids": row, "text_bytes": covered}


def open_tokens(folder: str | Path, split: str, *, tokenizer, max_length: int | None,
                with_bytes: bool = False) -> datasets.IterableDataset:
    """The documents of a token split as a datasets IterableDataset, one data source per shard.

    Rows are whole documents (`max_length` None: packing) or truncated to `max_length` as the tokenizer
    truncates; `with_bytes` adds `text_bytes`, the UTF-8 bytes of the text the row covers.
    """
    index = read_index(folder, split)
    check_tokenizer(index, tokenizer, folder)
    if with_bytes and not index["byte_ends"]:
        raise ValueError(f"token folder {folder}: {split} has no byte ends (needed for bits per byte)")
    gen_kwargs = {
        "shards": [shard["name"] for shard in index["shards"]],  # the one list: datasets shards and shuffles it
        "folder": str(split_folder(folder, split).resolve()),
        "dtype": index["dtype"],
        "suffix": tuple(index["special"]["suffix"]),  # a tuple: datasets would take a list for a shard list
        "max_length": max_length,
        "with_bytes": with_bytes,
    }
    return datasets.IterableDataset.from_generator(_read_documents, gen_kwargs=gen_kwargs)
