"""train.data: tokenisation and masking by hand, exact resume, workers and ranks without duplicates, epochs,
and --data_seed (the data order) apart from --seed (the initialisation) through the trainer.

Small hand-made shards (written to tmp_path in the C4 file layout) make document identity checkable;
the shared C4 sample checks the real pipeline. Everything runs offline.
"""
import dataclasses
import gzip
import inspect
import io
import json
import re

import pytest
import torch

from train import __main__ as trainer_cli
from train import loop
from train.config import TrainConfig
from train.data import (
    build_train_loader,
    check_data_source,
    iter_eval_batches,
    load_tokenizer,
    pad_documents,
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def write_shards(folder, train_shards, validation=("held out text",)):
    """C4-layout gzip json-lines shards: one file per list of texts in `train_shards`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"c4-train.{i:05d}-of-{len(train_shards):05d}.json.gz": texts for i, texts in enumerate(train_shards)}
    files["c4-validation.00000-of-00001.json.gz"] = list(validation)
    for name, texts in files.items():
        with gzip.open(folder / name, "wt", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n")
    return folder


@pytest.fixture
def numbered_dir(tmp_path):
    """4 shards x 10 documents "document <n>", n = 0..39: every document tokenises differently."""
    return write_shards(tmp_path / "numbered", [[f"document {10 * s + d}" for d in range(10)] for s in range(4)])


def document_numbers(batches, tokenizer):
    """Map each row back to n of its "document <n>" text."""
    numbers = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            text = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            assert text.startswith("document ")
            numbers.append(int(text.split()[1]))
    return numbers


def take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "labels"}
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- inputs and errors


def test_load_tokenizer_from_a_local_folder(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer("Hello world")["input_ids"] == [8774, 296, 1]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)


def test_load_tokenizer_unreadable_paths_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/missing: no such folder")):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/empty") + ".*cannot be loaded"):
        load_tokenizer(str(tmp_path / "empty"))


def test_check_data_source(tmp_path, c4_dir):
    check_data_source(None)  # the hub: nothing to check before reading
    check_data_source(c4_dir)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/absent: no such folder")):
        check_data_source(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"no shards matching c4-train\.\*\.json\.gz or c4-validation"):
        check_data_source(tmp_path)
    write_shards(tmp_path / "only_train", [["x"]])
    (tmp_path / "only_train" / "c4-validation.00000-of-00001.json.gz").unlink()
    with pytest.raises(ValueError, match=r"only_train: no shards matching c4-validation\.\*\.json\.gz$"):
        check_data_source(tmp_path / "only_train")


def test_bad_loader_arguments_fail_with_one_line(tmp_path, c4_dir, tokenizer):
    with pytest.raises(ValueError, match="max_length 1: must be at least 2"):
        build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=1, batch_size=2)
    with pytest.raises(ValueError, match=re.escape(f"data_dir {tmp_path}/nowhere: no such folder")):
        build_train_loader(tokenizer=tokenizer, data_dir=tmp_path / "nowhere", max_length=8, batch_size=2)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=8, batch_size=2, rank=2, world_size=2)
    one_document = write_shards(tmp_path / "one", [["Hello world"]])
    starved = build_train_loader(tokenizer=tokenizer, data_dir=one_document, max_length=8, batch_size=1, rank=1,
                                 world_size=2)
    with pytest.raises(ValueError, match="rank 1 of 2 has no training documents"):
        take(starved, 1)  # rather than waiting forever


# ----------------------------------------------------------------------------- tokenisation by hand


def test_padding_truncation_and_label_masking_by_hand(tmp_path, tokenizer):
    data = write_shards(tmp_path, [["Hello world", "a a a a a a a a a a"]])
    loader = build_train_loader(tokenizer=tokenizer, data_dir=data, max_length=6, batch_size=2, shuffle_buffer=1)
    batch = take(loader, 1)[0]
    # "Hello world" -> 8774 296 </s>=1, padded with 0; the long one truncated to 5 pieces + </s>.
    assert batch["input_ids"].tolist() == [[8774, 296, 1, 0, 0, 0], [3, 9, 3, 9, 3, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[8774, 296, 1, -100, -100, -100], [3, 9, 3, 9, 3, 1]]
    assert {t.dtype for t in batch.values()} == {torch.int64}


def test_pad_documents_masks_only_padding(tokenizer):
    rows = [[5, 6, 1], [7, 1], [8, 9, 10, 1]]
    batch = pad_documents(rows, tokenizer, 4)
    assert batch["labels"].tolist() == [[5, 6, 1, -100], [7, 1, -100, -100], [8, 9, 10, 1]]
    # the tensors of the tokenizer's own right padding, dtypes included
    reference = tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=4, padding_side="right",
                              return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert batch[key].dtype == reference[key].dtype == torch.int64 and torch.equal(batch[key], reference[key])
    with pytest.raises(ValueError, match="a row of 4 tokens does not fit max_length 3"):
        pad_documents(rows, tokenizer, 3)


def test_packing_joins_documents_with_eos_and_cuts_full_rows(tmp_path, tokenizer):
    data = write_shards(tmp_path, [["Hello world", "a a a", "The cat sat."]])
    loader = build_train_loader(
        tokenizer=tokenizer, data_dir=data, max_length=4, batch_size=2, packing=True, shuffle_buffer=1
    )
    first, second = take(loader, 2)
    # stream: [8774 296 1] [3 9 3 9 3 9 1] [37 1712 3 7 144 5 1] then the next epoch's documents.
    assert first["input_ids"].tolist() == [[8774, 296, 1, 3], [9, 3, 9, 3]]
    assert second["input_ids"].tolist() == [[9, 1, 37, 1712], [3, 7, 144, 5]]
    assert torch.equal(first["labels"], first["input_ids"])
    assert first["attention_mask"].eq(1).all()


def test_real_c4_batches(c4_dir, tokenizer):
    loader = build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=64, batch_size=16, shuffle_buffer=100)
    batch = take(loader, 1)[0]
    assert batch["input_ids"].shape == (16, 64)
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert batch["labels"][~mask].eq(-100).all() and batch["input_ids"][~mask].eq(0).all()
    lengths = mask.sum(1)
    assert batch["input_ids"][torch.arange(16), lengths - 1].eq(1).all()  # every row ends in </s>
    assert batch["input_ids"].max() < 32000  # the C4 sample has no <extra_id_*> text


def test_eval_batches_are_the_validation_file_in_order(tmp_path, tokenizer):
    data = write_shards(tmp_path, [["x"]], validation=["Hello world", "a a a", "The cat sat."])
    batches = list(iter_eval_batches(tokenizer=tokenizer, data_dir=data, max_length=8, batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["input_ids"].tolist() == [[8774, 296, 1, 0, 0, 0, 0, 0], [3, 9, 3, 9, 3, 9, 1, 0]]
    rank1 = list(
        iter_eval_batches(tokenizer=tokenizer, data_dir=data, max_length=8, batch_size=2, rank=1, world_size=2)
    )
    assert rank1[0]["input_ids"].tolist() == [[3, 9, 3, 9, 3, 9, 1, 0]]


# ----------------------------------------------------------------------------- epochs, workers, ranks


def test_workers_yield_each_document_once_per_epoch_and_epochs_differ(numbered_dir, tokenizer):
    loader = build_train_loader(
        tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=4, workers=2, shuffle_buffer=16
    )
    numbers = document_numbers(take(loader, 20), tokenizer)  # 2 epochs of 40 documents
    epoch0, epoch1 = numbers[:40], numbers[40:]
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1
    # An epoch's order depends on (seed, epoch, rank) only: set_epoch(1) on a fresh loader replays it.
    fresh = build_train_loader(
        tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=4, workers=2, shuffle_buffer=16
    )
    fresh.set_epoch(1)
    assert document_numbers(take(fresh, 10), tokenizer) == epoch1


@pytest.mark.parametrize("world_size", [2, 3])  # 4 shards: split by shards, then by every 3rd document
def test_ranks_split_each_epoch_without_overlap(numbered_dir, tokenizer, world_size):
    # Shard order is reshuffled per epoch, so a rank may read other shards in the next epoch;
    # what must hold is that each epoch, the ranks together read every document exactly once.
    per_epoch = {0: [], 1: []}
    for rank in range(world_size):
        loader = build_train_loader(
            tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=1,
            rank=rank, world_size=world_size, shuffle_buffer=4,
        )
        iterator = iter(loader)
        while True:
            number = document_numbers([next(iterator)], tokenizer)[0]
            if loader.epoch == 2:
                break
            per_epoch[loader.epoch].append(number)  # batch_size 1: a batch belongs to one epoch
    for numbers in per_epoch.values():
        assert sorted(numbers) == list(range(40))


# ----------------------------------------------------------------------------- resume


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_resume(make_loader, before, after):
    """Batches `before`+1 .. `before`+`after` of an uninterrupted loader == those of a resumed one."""
    original = make_loader()
    iterator = iter(original)
    for _ in range(before):
        next(iterator)
    state = roundtrip(original.state_dict())
    expected = [next(iterator) for _ in range(after)]
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert_same_batches(expected, take(resumed, after))
    return state


def test_resume_is_bit_identical_on_c4(c4_dir, tokenizer):
    def make():
        return build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=32, batch_size=8, shuffle_buffer=64)

    state = check_resume(make, before=3, after=4)
    assert state["epoch"] == 0 and len(state["buffer"]["rows"]["lengths"]) == 64  # the buffer was saved full


def test_resume_is_bit_identical_with_packing_and_a_worker(c4_dir, tokenizer):
    def make():
        return build_train_loader(
            tokenizer=tokenizer, data_dir=c4_dir, max_length=32, batch_size=8, packing=True, workers=1,
            shuffle_buffer=32,
        )

    check_resume(make, before=3, after=4)


@pytest.mark.parametrize("before", [5, 12])  # mid-stream, and while draining the buffer at the epoch's end
def test_resume_across_the_epoch_boundary_with_two_workers(numbered_dir, tokenizer, before):
    def make():
        return build_train_loader(
            tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=3, workers=2, shuffle_buffer=8
        )

    state = check_resume(make, before=before, after=6)  # 40 documents = 13.3 batches per epoch
    assert state["stream_finished"] == (before == 12)


def test_loading_a_state_of_other_settings_fails(c4_dir, tokenizer):
    state = build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=16, batch_size=4).state_dict()
    other = build_train_loader(tokenizer=tokenizer, data_dir=c4_dir, max_length=16, batch_size=8)
    with pytest.raises(ValueError, match="'batch_size': 4"):
        other.load_state_dict(state)


@pytest.mark.parametrize("before", [4, 13])
def test_resume_with_another_data_seed(numbered_dir, tokenizer, before):
    def make():
        return build_train_loader(tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=3, seed=7,
                                  shuffle_buffer=8)

    assert check_resume(make, before=before, after=5)["settings"]["seed"] == 7


# ----------------------------------------------------------------------------- --data_seed and --seed


TINY_LLAMA = {  # hidden 16, 1 layer; vocab 32128 covers t5-base's 32100 ids
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32128, "hidden_size": 16,
    "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
    "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 1, "use_cache": False,
}


def test_data_seed_changes_the_order_and_seed_alone_does_not(numbered_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Three 2-update runs: --seed 0 and 1 at the default --data_seed train on the same batches; --data_seed 7 not."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_LLAMA))
    batches: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    real_build, run = loop.build_train_loader, []

    def recording(**kwargs):  # the loop's loader, recording every batch the loop takes from it
        loader, seen = real_build(**kwargs), batches[run[-1]]

        class Recorded:
            state_dict, load_state_dict = loader.state_dict, loader.load_state_dict
            unk_mapped = property(lambda self: loader.unk_mapped)

            def __iter__(self):
                for batch in loader:
                    seen.append(batch["input_ids"].clone())
                    yield batch
        return Recorded()

    monkeypatch.setattr(loop, "build_train_loader", recording)
    for name, flags in {"a": [], "b": ["--seed", "1"], "c": ["--data_seed", "7"]}.items():
        run.append(name)
        argv = ["--model_config", str(tmp_path / "tiny.json"), "--data_dir", str(numbered_dir), "--tokenizer",
                str(tokenizer_dir), "--max_length", "8", "--batch_size", "4", "--num_training_steps", "2",
                "--warmup_steps", "0", "--eval_tokens", "10", "--workers", "0", "--dtype", "float32",
                "--wandb", "disabled", "--save_dir", str(tmp_path / name), *flags]
        assert trainer_cli.main(argv) == 0
    a, b, c = (torch.stack(batches[name]) for name in "abc")
    assert a.shape == (2, 4, 8) and torch.equal(a, b) and not torch.equal(a, c)
    configs = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in "abc"}
    assert [(configs[n]["seed"], configs[n]["data_seed"]) for n in "abc"] == [(0, 42), (1, 42), (0, 7)]
    losses = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["loss"] for n in "abc"}
    assert losses["a"] != losses["b"]  # same batches, other initialisation


def test_the_seed_orders_the_shards_and_the_buffer(numbered_dir, tokenizer):
    """shuffle_buffer 1 leaves only the shard order: documents 10s..10s+9 in file order, shards permuted by the seed."""
    def shard_order(seed, shuffle_buffer=1):
        loader = build_train_loader(tokenizer=tokenizer, data_dir=numbered_dir, max_length=8, batch_size=10, seed=seed,
                                    shuffle_buffer=shuffle_buffer)
        return document_numbers(take(loader, 4), tokenizer)

    orders = {seed: shard_order(seed) for seed in (42, 7)}
    for numbers in orders.values():  # whole shards, each in file order
        assert [numbers[i : i + 10] for i in range(0, 40, 10)] == [list(range(n - n % 10, n - n % 10 + 10))
                                                                    for n in numbers[::10]]
    assert orders[42][::10] != orders[7][::10]
    assert shard_order(42, shuffle_buffer=8) != orders[42]  # the buffer permutes documents as well


def test_default_data_seed_is_the_order_of_earlier_runs():
    default = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}["data_seed"]
    assert default == inspect.signature(build_train_loader).parameters["seed"].default == 42


# ----------------------------------------------------------------------------- ids past the embedding (issue 25)
SENTINEL_TEXTS = ["plain text", "a literal <extra_id_0> in C4", "two <extra_id_0> and <extra_id_5>", "more plain text"]


@pytest.mark.parametrize("packing", [False, True])
def test_ids_past_the_vocabulary_become_unk_and_are_counted(tmp_path, tokenizer, packing):
    """t5-base's <extra_id_0> is id 32099: a vocab-32000 model would index past its embedding. The loader maps
    it to <unk> (inputs and labels), counts it, and the count survives a save/load of its state."""
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099 and tokenizer.unk_token_id == 2
    data = write_shards(tmp_path, [SENTINEL_TEXTS * 2])

    def loader(**extra):
        return build_train_loader(tokenizer=tokenizer, data_dir=data, max_length=16, batch_size=2, shuffle_buffer=1,
                                  packing=packing, **extra)
    raw = take(loader(), 2)                       # no vocab_size: ids as the tokenizer made them
    mapped_loader = loader(vocab_size=32000)
    mapped = take(mapped_loader, 2)
    raw_ids = torch.cat([b["input_ids"] for b in raw])
    sentinels = int((raw_ids >= 32000).sum())
    assert sentinels >= 3 and int(raw_ids.max()) == 32099
    assert mapped_loader.unk_mapped == sentinels
    for before, after in zip(raw, mapped):
        for key in ("input_ids", "labels"):
            assert torch.equal(after[key], before[key].masked_fill(before[key] >= 32000, 2)), key
    resumed = loader(vocab_size=32000)
    resumed.load_state_dict(mapped_loader.state_dict())
    assert resumed.unk_mapped == sentinels


def test_eval_batches_map_and_count_ids_past_the_vocabulary(tmp_path, tokenizer):
    data = write_shards(tmp_path, [["x"]], validation=SENTINEL_TEXTS)
    batches = list(iter_eval_batches(tokenizer=tokenizer, data_dir=data, max_length=16, batch_size=2, vocab_size=32000))
    assert [int(b["unk_mapped"]) for b in batches] == [1, 2]
    assert all(int(b["input_ids"].max()) < 32000 for b in batches)


def test_a_run_on_documents_with_sentinels_trains_evaluates_and_logs_the_count(tmp_path, tokenizer_dir, capsys):
    """End to end with a vocab-32000 model (the published configs' size): no IndexError, the count is logged."""
    from tests.train.test_cli import read_metrics, tiny_args
    texts = [f"{text} number {i}" for i in range(30) for text in SENTINEL_TEXTS]
    data = write_shards(tmp_path / "data", [texts], validation=SENTINEL_TEXTS * 4)
    argv = tiny_args(tmp_path, data, tokenizer_dir, tmp_path / "run", num_training_steps=2, eval_every=2,
                     save_every=2, log_every=1)
    config_path = next(tmp_path.glob("llama_tiny.json"))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "vocab_size": 32000}))
    assert trainer_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "token ids 32000..32099 (<extra_id_0> ...) read as <unk>; counted as data/unk_mapped_tokens" in err
    records = read_metrics(tmp_path / "run")
    counts = [r["data/unk_mapped_tokens"] for r in records if "data/unk_mapped_tokens" in r]
    assert counts and counts[-1] > 0
    assert any(r.get("eval/unk_mapped_tokens", 0) > 0 for r in records)
