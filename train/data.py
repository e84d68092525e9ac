"""C4 for training and evaluation: streamed with `datasets`, tokenised with t5-base, resumable.

The training pipeline, per data-parallel rank:

    load_dataset (json shards of --data_dir, or the hub's allenai/c4 "en"), streaming, column "text"
      -> shuffle the shard order (datasets `shuffle(seed, buffer_size=1)`: seed + epoch, no buffer)
      -> split_dataset_by_node(rank, world_size)            (shards if they divide, else every n-th doc)
      -> tokenize: one document per row, truncated to max_length (t5 appends </s>);
         with packing, the whole document                    (datasets.map, in the DataLoader workers)
      -> StatefulDataLoader(workers): each worker reads its own shards, so no document is read twice
      -> document shuffle buffer (here, in the main process, seeded by seed/epoch/rank)
      -> batch: pad to max_length, labels = ids with padding set to -100
         or, with packing, concatenate documents (each ends in </s>) and cut full rows, labels = ids.

Why the document buffer is ours and not `IterableDataset.shuffle(buffer_size=...)`: datasets cannot
checkpoint its buffer ("examples from shuffle buffers are lost when resuming", its `state_dict`
docstring), so a resumed run would silently see different data. Below the buffer everything is
datasets' own resumable state (shard, position, epoch) carried by torchdata's StatefulDataLoader
across workers; the buffer contents, its random generator and the not-yet-batched documents are
saved beside it. A resumed loader therefore yields bit-for-bit the batches the uninterrupted one would
have yielded, and never re-reads data to get there beyond what datasets does inside one shard.

Epochs: the loader never ends. When this rank's stream is exhausted the buffer is drained, the epoch
count goes up, and a new pass starts with a new shard order and a new buffer permutation; batches
run on across the boundary, so no document is dropped. The number of steps decides when training stops.
A state can only be loaded into a loader with the same settings (batch, length, seed, rank, world
size, workers, packing, buffer): per-worker positions cannot be re-dealt to another worker count.

Pretokenized shards (`python -m train.pretokenize`, format in train/token_shards.py): with a token
folder as data_dir (detected, or data_format="tokens") the json read + tokenisation steps are replaced
by memory-mapped token shards, one per source json file, read as a datasets IterableDataset with one
data source per shard; everything from the shard shuffle on is the same code. For the same settings
(seed, rank, world size, workers, batch, length, packing, buffer) and shards written from the same
files with the same tokenizer, the two paths yield bit-identical batches, epoch after epoch
(tests/train/test_pretokenize.py); their checkpointed positions differ, so a run resumes in the format
it was saved in.

Token ids: t5-base's 100 `<extra_id_N>` tokens (32000..32099) come out where a document contains that literal
text (C4's 365M documents surely do) and would index past the vocab-32000 embeddings. Given the model's
`vocab_size`, both loaders map every id >= it to `<unk>` (inputs and labels) and count them
(`TrainLoader.unk_mapped`, kept in its state; eval batches' `unk_mapped`), logged as `data/unk_mapped_tokens`.
"""
from __future__ import annotations

import glob
import itertools
import warnings
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from train import token_shards

HUB_DATASET = ("allenai/c4", "en")
SHARD_PATTERNS = {"train": "c4-train.*.json.gz", "validation": "c4-validation.*.json.gz"}
DATA_FORMATS = ("auto", "text", "tokens")  # auto: tokens when data_dir is a train.pretokenize folder
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips
# Documents per tokenizer call: large enough for the fast tokenizer's batching, small enough that a
# resume (datasets re-runs the interrupted map batch) and the first batch cost little.
TOKENIZE_BATCH = 64


# ----------------------------------------------------------------------------- inputs


def load_tokenizer(name_or_path: str | PathLike = "t5-base") -> PreTrainedTokenizerBase:
    """AutoTokenizer from a hub name (e.g. "t5-base") or a local folder; failure is one ValueError line."""
    text = str(name_or_path)
    # A hub name is "t5-base" or "google-t5/t5-base"; a Path, an absolute/relative path or an existing
    # entry is local and must be a folder (never a silent fall-back to the hub).
    looks_local = isinstance(name_or_path, PathLike) or text.startswith(("/", ".", "~")) or Path(text).exists()
    if looks_local and not Path(text).expanduser().is_dir():
        raise ValueError(f"tokenizer path {name_or_path}: no such folder")
    if looks_local:
        text = str(Path(text).expanduser())
    try:
        return AutoTokenizer.from_pretrained(text)
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tokenizer {name_or_path}: cannot be loaded ({reason})") from None


def check_data_source(data_dir: str | PathLike | None, data_format: str = "auto") -> str:
    """Fail fast, reading no data; returns the format, "text" or "tokens".

    `None` means the hub (allenai/c4 "en", text); a json folder needs both shard kinds, a token folder
    both splits consistent with their index (train/token_shards.py).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format {data_format!r}: must be one of {', '.join(DATA_FORMATS)}")
    if data_dir is None:
        if data_format == "tokens":
            raise ValueError("data_format tokens needs a data_dir written by python -m train.pretokenize")
        return "text"
    path = Path(data_dir)
    if not path.is_dir():
        raise ValueError(f"data_dir {path}: no such folder")
    if data_format == "tokens" or (data_format == "auto" and token_shards.is_token_folder(path)):
        token_shards.check_token_folder(path)
        return "tokens"
    missing = [pattern for pattern in SHARD_PATTERNS.values() if not glob.glob(str(path / pattern))]
    if missing:
        raise ValueError(f"data_dir {path}: no shards matching {' or '.join(missing)}")
    return "text"


def open_c4(data_dir: str | PathLike | None, split: str) -> datasets.IterableDataset:
    """The raw streamed documents of `split` ("train" or "validation"), column `text` only."""
    check_data_source(data_dir)
    if data_dir is None:
        stream = datasets.load_dataset(*HUB_DATASET, split=split, streaming=True)
    else:
        files = sorted(glob.glob(str(Path(data_dir) / SHARD_PATTERNS[split])))
        # The json builder names its only split "train", whichever files it reads.
        stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    return stream.select_columns(["text"])


def tokenize(stream: datasets.IterableDataset, tokenizer, *, max_length: int, packing: bool):
    """Documents -> rows of token ids (column `input_ids` only); the one tokenisation of train and eval.

    Without packing a row is the document truncated to `max_length` tokens, `</s>` included (the
    tokenizer keeps room for it); with packing it is the whole document, `</s>` at its end.
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if packing:
            ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        else:
            ids = tokenizer(batch["text"], max_length=max_length, truncation=True)["input_ids"]
        return {"input_ids": ids}

    return stream.map(encode, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=["text"])


def pad_documents(documents: list[list[int]], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to `max_length` with the pad id: `input_ids`, `attention_mask` and `labels` (padding -> -100).

    The same tensors as `tokenizer.pad(..., padding="max_length", padding_side="right")`, built in numpy:
    torch.tensor on nested lists was most of the loader's time on pretokenized data.
    """
    lengths = np.fromiter((len(row) for row in documents), dtype=np.int64, count=len(documents))
    if lengths.max(initial=0) > max_length:
        raise ValueError(f"a row of {lengths.max()} tokens does not fit max_length {max_length}")
    mask = np.arange(max_length) < lengths[:, None]  # (B, T)
    ids = np.full((len(documents), max_length), tokenizer.pad_token_id, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64, count=int(lengths.sum()))
    input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def map_out_of_vocabulary(batch: dict[str, torch.Tensor], vocab_size: int | None, unk_token_id: int | None) -> int:
    """In place: every id >= `vocab_size` in `input_ids` and `labels` becomes `unk_token_id` (labels' -100 stay);
    returns how many input ids were mapped. `vocab_size` None: nothing to do."""
    if vocab_size is None:
        return 0
    ids = batch["input_ids"]
    outside = ids >= vocab_size
    mapped = int(outside.sum())
    if mapped:
        ids[outside] = unk_token_id
        labels = batch["labels"]
        labels[labels >= vocab_size] = unk_token_id
    return mapped


def packed_rows(tokens: list[int], batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """`batch_size * max_length` concatenated tokens as full rows: no padding, labels = ids."""
    ids = torch.from_numpy(np.fromiter(tokens, dtype=np.int64, count=len(tokens))).view(batch_size, max_length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tokenize_with_bytes(stream: datasets.IterableDataset, tokenizer, *, max_length: int):
    """Documents -> the rows of `tokenize` (truncated) and `text_bytes`, the UTF-8 bytes of the text each covers.

    A document kept whole covers its whole text; a truncated one the text up to the end of its last
    kept text token (character offsets of the fast tokenizer; train.token_shards.covered_bytes).
    """
    _, suffix = token_shards.special_tokens(tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch["text"], return_offsets_mapping=True, verbose=False)
        rows, covered = [], []
        for text, ids, offsets in zip(batch["text"], encoded["input_ids"], encoded["offset_mapping"]):
            row = token_shards.truncate(ids, max_length, suffix)  # = tokenizer(..., truncation=True)
            ends = token_shards.byte_ends(text, offsets) if len(row) < len(ids) else None
            covered.append(token_shards.covered_bytes(len(row), len(ids), token_shards.text_bytes(text), ends, len(suffix)))
            rows.append(row)
        return {"input_ids": rows, "text_bytes": covered}

    return stream.map(encode, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=["text"])


def iter_eval_batches(*, tokenizer, data_dir, max_length: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      data_format: str = "auto", vocab_size: int | None = None):
    """Validation batches of this rank, in file order (no shuffle): identical on every run.

    Besides the padded rows each batch has `text_bytes` (B,): the UTF-8 bytes of the text each row covers,
    and `unk_mapped`: how many of its ids were >= `vocab_size` and became `<unk>` (`map_out_of_vocabulary`).
    """
    _check_lengths(max_length=max_length, batch_size=batch_size, rank=rank, world_size=world_size)
    if check_data_source(data_dir, data_format) == "tokens":
        documents = token_shards.open_tokens(data_dir, "validation", tokenizer=tokenizer, max_length=max_length,
                                             with_bytes=True)
        rows = split_dataset_by_node(documents, rank=rank, world_size=world_size)
    else:
        stream = split_dataset_by_node(open_c4(data_dir, "validation"), rank=rank, world_size=world_size)
        rows = tokenize_with_bytes(stream, tokenizer, max_length=max_length)
    documents, covered = [], []
    for row in rows:
        documents.append(row["input_ids"])
        covered.append(row["text_bytes"])
        if len(documents) == batch_size:
            yield _eval_batch(documents, covered, tokenizer, max_length, vocab_size)
            documents, covered = [], []
    if documents:
        yield _eval_batch(documents, covered, tokenizer, max_length, vocab_size)


def _eval_batch(documents, covered, tokenizer, max_length: int, vocab_size: int | None) -> dict[str, Any]:
    batch = pad_documents(documents, tokenizer, max_length)
    mapped = map_out_of_vocabulary(batch, vocab_size, tokenizer.unk_token_id)
    return {**batch, "text_bytes": torch.tensor(covered), "unk_mapped": torch.tensor(mapped)}


def _check_lengths(*, max_length: int, batch_size: int, rank: int, world_size: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: must be at least 2 (a token and its next-token target)")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")


# ----------------------------------------------------------------------------- shuffle buffer


def _encode_rows(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """A list of token lists as two tensors (flat int32 tokens and row lengths) for a checkpoint."""
    flat = [token for row in rows for token in row]
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    return {"tokens": torch.tensor(flat, dtype=torch.int32), "lengths": lengths}


def _decode_rows(state: dict[str, torch.Tensor]) -> list[list[int]]:
    flat = state["tokens"].tolist()
    rows, start = [], 0
    for length in state["lengths"].tolist():
        rows.append(flat[start : start + length])
        start += length
    return rows


class DocumentShuffleBuffer:
    """Reservoir-style shuffle buffer whose contents and generator state can be checkpointed.

    `push(doc)`: while fewer than `size` documents are held, keep it and return None; once full,
    return a uniformly chosen held document and keep `doc` in its place. `drain()` returns what is
    left in a random order. With size 1 documents pass straight through (no shuffling).
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        self.rows: list[list[int]] = []

    def push(self, row: list[int]) -> list[int] | None:
        if len(self.rows) < self.size:
            self.rows.append(row)
            return None
        index = int(self.rng.integers(self.size))
        out, self.rows[index] = self.rows[index], row
        return out

    def drain(self) -> list[list[int]]:
        order = self.rng.permutation(len(self.rows))
        rows, self.rows = [self.rows[i] for i in order], []
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"rows": _encode_rows(self.rows), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = _decode_rows(state["rows"])
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------- train loader


def _token_lists(examples: list[dict[str, list[int]]]) -> list[list[int]]:
    """DataLoader collate: keep variable-length rows as lists (they are batched after the shuffle)."""
    return [example["input_ids"] for example in examples]


class TrainLoader:
    """Endless, resumable iterator of training batches for one rank (see the module docstring).

    Yields dicts of LongTensor (batch_size, max_length): `input_ids`, `attention_mask`, `labels`.
    `state_dict()` is made of python numbers, strings, dicts, lists and tensors only, so it
    round-trips `torch.save`/`torch.load(weights_only=True)`; only one iterator at a time is meaningful.
    """

    def __init__(
        self,
        documents: datasets.IterableDataset,
        *,
        tokenizer,
        max_length: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        packing: bool,
        shuffle_buffer: int,
        data_format: str = "text",
        vocab_size: int | None = None,
    ):
        self.documents = documents
        self.vocab_size = vocab_size  # ids >= it become <unk> (counted in unk_mapped); None: ids kept as they are
        self.unk_mapped = 0
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.packing = packing
        self.shuffle_buffer = shuffle_buffer
        self.data_format = data_format
        # Documents (or, with packing, tokens) out of the buffer that do not fill a batch yet; they
        # carry over into the next epoch's first batch.
        self.ready: list = []
        self.used = 0  # ready[:used] is consumed; the head is cut off once it is half the list (not per batch)
        self._start_epoch(0)

    # --- one pass over the stream

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream_finished = False
        self.buffer = DocumentShuffleBuffer(self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank]))
        self.documents.set_epoch(epoch)
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: noise, not a problem of ours.
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            self.loader = StatefulDataLoader(
                self.documents,
                batch_size=self.batch_size,  # documents per transfer from a worker, not a training batch
                num_workers=self.workers,
                collate_fn=_token_lists,
            )

    def _take(self, row: list[int]) -> None:
        if self.packing:
            self.ready.extend(row)
        else:
            self.ready.append(row)

    def _full_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        # A drained buffer can put a whole epoch in `ready`: cutting its head at every batch would be quadratic.
        size = self.batch_size * self.max_length if self.packing else self.batch_size
        while len(self.ready) - self.used >= size:
            chunk = self.ready[self.used : self.used + size]
            self.used += size
            if 2 * self.used >= len(self.ready):
                del self.ready[: self.used]
                self.used = 0
            if self.packing:
                batch = packed_rows(chunk, self.batch_size, self.max_length)
            else:
                batch = pad_documents(chunk, self.tokenizer, self.max_length)
            self.unk_mapped += map_out_of_vocabulary(batch, self.vocab_size, self.tokenizer.unk_token_id)
            yield batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        empty_passes = 0  # a resumed pass may have nothing left; two in a row means no data at all
        while True:
            if self.stream_finished:
                self._start_epoch(self.epoch + 1)
            # All bookkeeping is updated before each yield, so state_dict() between batches is exact.
            documents = 0
            for chunk in self.loader:
                documents += len(chunk)
                for row in chunk:
                    out = self.buffer.push(row)
                    if out is not None:
                        self._take(out)
                yield from self._full_batches()
            for row in self.buffer.drain():
                self._take(row)
            self.stream_finished = True
            yield from self._full_batches()
            empty_passes = empty_passes + 1 if documents == 0 else 0
            if empty_passes == 2:
                raise ValueError(f"rank {self.rank} of {self.world_size} has no training documents to read")

    def set_epoch(self, epoch: int) -> None:
        """Restart at the beginning of pass `epoch` (its own shard order and buffer permutation)."""
        self.ready, self.used = [], 0
        self._start_epoch(epoch)

    # --- checkpointing

    def _settings(self) -> dict[str, Any]:
        names = ("max_length", "batch_size", "seed", "rank", "world_size", "workers", "packing", "shuffle_buffer",
                 "data_format")
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict[str, Any]:
        waiting = self.ready[self.used :]
        ready = torch.tensor(waiting, dtype=torch.int32) if self.packing else _encode_rows(waiting)
        return {
            "settings": self._settings(),
            "epoch": self.epoch,
            "stream_finished": self.stream_finished,
            "loader": None if self.stream_finished else self.loader.state_dict(),
            "buffer": self.buffer.state_dict(),
            "ready": ready,
            "unk_mapped": self.unk_mapped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the loader settings must be the same."""
        saved, here = {"data_format": "text", **state["settings"]}, self._settings()  # older states: text
        if saved != here:
            raise ValueError(f"data loader state was saved with {saved}, this loader has {here}")
        self._start_epoch(state["epoch"])
        self.stream_finished = state["stream_finished"]
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        self.buffer.load_state_dict(state["buffer"])
        self.ready = state["ready"].tolist() if self.packing else _decode_rows(state["ready"])
        self.used = 0
        self.unk_mapped = int(state.get("unk_mapped", 0))  # states saved before the count existed: 0


def build_train_loader(
    *,
    tokenizer,
    data_dir: str | PathLike | None,
    max_length: int,
    batch_size: int,
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    packing: bool = False,
    shuffle_buffer: int = 10_000,
    data_format: str = "auto",
    vocab_size: int | None = None,
) -> TrainLoader:
    """The endless training loader of `rank` (see the module docstring for the pipeline).

    `seed` decides the data order only (shard order and shuffle buffer); the trainer passes --data_seed.
    `vocab_size` (the model's): ids >= it become the tokenizer's `<unk>`, counted in `loader.unk_mapped`.
    """
    if vocab_size is not None and vocab_size < len(tokenizer) and tokenizer.unk_token_id is None:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, the model {vocab_size}, and no unk token to map "
                         f"the others to: use a model config with vocab_size >= {len(tokenizer)}")
    _check_lengths(max_length=max_length, batch_size=batch_size, rank=rank, world_size=world_size)
    if workers < 0:
        raise ValueError(f"workers {workers}: must be >= 0")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer {shuffle_buffer}: must be >= 1 (1 = no document shuffling)")
    data_format = check_data_source(data_dir, data_format)
    if data_format == "tokens":  # rows come out of the shards as `tokenize` would make them
        stream = token_shards.open_tokens(data_dir, "train", tokenizer=tokenizer, max_length=None if packing else max_length)
    else:
        stream = open_c4(data_dir, "train")
    # Shard order only: a one-document datasets buffer holds nothing that a checkpoint could lose.
    stream = stream.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    documents = stream if data_format == "tokens" else tokenize(stream, tokenizer, max_length=max_length, packing=packing)
    return TrainLoader(
        documents,
        tokenizer=tokenizer,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=workers,
        packing=packing,
        shuffle_buffer=shuffle_buffer,
        data_format=data_format,
        vocab_size=vocab_size,
    )
