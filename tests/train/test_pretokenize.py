"""train.pretokenize and the token-shard path: the files by hand, the same batches as the streaming loader, resume, errors.

"Same order" means: for the same loader settings (seed, rank, world size, workers, batch, max_length,
packing, shuffle buffer), a token folder written from the same json files with the same tokenizer yields
bit-identical batches (input_ids, attention_mask, labels) to the json folder, batch after batch and
across epochs: without packing each row is the document truncated as the tokenizer truncates it (first
max_length - 1 ids, then </s>) and right-padded; with packing the whole documents, each ending in </s>,
are concatenated in the same order and cut into the same full rows. Validation batches are identical
too, text_bytes included.
"""
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from train import __main__ as trainer_cli
from train import pretokenize
from train.data import build_train_loader, check_data_source, iter_eval_batches, load_tokenizer
from train.token_shards import byte_ends, read_index, token_dtype

from tests.train.test_data import assert_same_batches, check_resume, take, write_shards


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def text(n):
    """Document n: its number, then 0..12 words, some with 2-, 3- and 4-byte UTF-8 characters."""
    words = ["café", "zwölf", "naïve", "€", "😀", "plain"]
    return " ".join([f"document {n}"] + [words[(n + i) % len(words)] for i in range(n % 13)])


VALIDATION = ["Hello world", "café au\nlait", "é " * 100, "naïve 😀 emoji"] + [text(n) for n in range(7)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_dir):
    """(json folder, token folder): 4 train shards x 10 documents, 11 validation documents."""
    root = tmp_path_factory.mktemp("pretokenize")
    json_dir = write_shards(root / "json", [[text(10 * s + d) for d in range(10)] for s in range(4)], VALIDATION)
    assert pretokenize.main(["--data_dir", str(json_dir), "--tokenizer", str(tokenizer_dir),
                             "--out", str(root / "tokens")]) == 0
    return json_dir, root / "tokens"


def json_texts(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ----------------------------------------------------------------------------- the files


def test_shards_hold_the_tokenizer_ids_of_each_file_in_order(folders, tokenizer):
    json_dir, token_dir = folders
    index = read_index(token_dir, "train")
    sources = sorted(json_dir.glob("c4-train.*.json.gz"))
    assert [shard["name"] for shard in index["shards"]] == [p.name.removesuffix(".json.gz") for p in sources]
    assert (index["dtype"], index["vocab_size"], index["special"]) == (
        "uint16", 32100, {"prefix": [], "suffix": [1], "pad_token_id": 0, "eos_token_id": 1})
    assert (index["documents"], index["byte_ends"]) == (40, False)
    for shard, source in zip(index["shards"], sources):
        texts = json_texts(source)
        expected = [tokenizer(t)["input_ids"] for t in texts]  # whole documents, </s> at the end
        tokens = np.fromfile(token_dir / "train" / f"{shard['name']}.tokens", dtype=np.uint16)
        offsets = np.load(token_dir / "train" / f"{shard['name']}.offsets.npy")
        assert tokens.tolist() == [i for ids in expected for i in ids]
        assert offsets.tolist() == np.cumsum([0] + [len(ids) for ids in expected]).tolist()
        assert np.load(token_dir / "train" / f"{shard['name']}.text_bytes.npy").tolist() == [len(t.encode()) for t in texts]
        assert shard["tokens"] == len(tokens) and shard["source"] == str(source.resolve())
    assert index["tokens"] == sum(s["tokens"] for s in index["shards"])


def test_validation_byte_ends_by_hand(folders):
    _, token_dir = folders
    index = read_index(token_dir, "validation")
    assert index["byte_ends"]
    name = index["shards"][0]["name"]
    ends = np.fromfile(token_dir / "validation" / f"{name}.byte_ends", dtype=np.uint32).tolist()
    offsets = np.load(token_dir / "validation" / f"{name}.offsets.npy").tolist()
    # "Hello world" = ▁Hello ▁world </s>: ends at bytes 5, 11, and </s> repeats 11.
    assert ends[offsets[0] : offsets[1]] == [5, 11, 11]
    # "café au\nlait" = ▁café(0-4 chars) ▁au ▁la it </s>: é is 2 bytes, so 5, 8, 11, 13, 13.
    assert ends[offsets[1] : offsets[2]] == [5, 8, 11, 13, 13]
    # "naïve 😀 emoji" = ▁ n a <unk>=ï ve ▁ <unk>=😀 ▁ e m o ji </s>, character offsets (0,1) (0,1) (1,2)
    # (2,3) (3,5) (6,7) (6,7) (8,9) (8,9) (9,10) (10,13); ï is 2 bytes and the emoji 4, so:
    assert ends[offsets[3] : offsets[4]] == [1, 1, 2, 4, 6, 11, 11, 13, 13, 14, 17, 17]


def test_byte_ends_helper_counts_utf8_widths():
    text = "aé€😀"  # 1 + 2 + 3 + 4 bytes
    offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 0)]
    assert byte_ends(text, offsets).tolist() == [1, 3, 6, 10, 10]
    assert (token_dtype(65536), token_dtype(65537)) == ("uint16", "uint32")


# ----------------------------------------------------------------------------- same batches as the streaming path


ORDERS = [  # (packing, workers, world_size, seed)
    (False, 0, 1, 42), (True, 0, 1, 42), (False, 0, 1, 7), (True, 2, 1, 42), (False, 2, 1, 42),
    (False, 0, 2, 42),  # 4 shards split by shards
    (True, 0, 3, 42),  # 4 shards over 3 ranks: every 3rd document
]


@pytest.mark.parametrize("packing, workers, world_size, seed", ORDERS)
def test_token_path_yields_the_streaming_batches(folders, tokenizer, packing, workers, world_size, seed):
    json_dir, token_dir = folders
    for rank in range(world_size):
        def make(data_dir):
            return build_train_loader(tokenizer=tokenizer, data_dir=data_dir, max_length=8, batch_size=3, seed=seed,
                                      rank=rank, world_size=world_size, workers=workers, packing=packing,
                                      shuffle_buffer=8)
        text_loader, token_loader = make(json_dir), make(token_dir)
        assert (text_loader.data_format, token_loader.data_format) == ("text", "tokens")
        count = 40 if packing else 30  # over 2 epochs of this rank's documents
        expected = take(text_loader, count)
        assert_same_batches(expected, take(token_loader, count))
        assert token_loader.epoch >= 1  # the epoch boundary was crossed
        if not packing:  # truncation happened: some row is full and ends in </s>
            assert any(batch["attention_mask"][:, -1].any() for batch in expected)


def test_validation_batches_match_the_text_path(folders, tokenizer):
    json_dir, token_dir = folders
    for world_size in (1, 2):
        for rank in range(world_size):
            kwargs = dict(tokenizer=tokenizer, max_length=8, batch_size=3, rank=rank, world_size=world_size)
            text_batches = list(iter_eval_batches(data_dir=json_dir, **kwargs))
            token_batches = list(iter_eval_batches(data_dir=token_dir, **kwargs))
            assert len(text_batches) == len(token_batches) > 0
            for a, b in zip(text_batches, token_batches):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = next(iter_eval_batches(data_dir=token_dir, tokenizer=tokenizer, max_length=8, batch_size=4))
    # Hello world: whole (11); café au\nlait: whole (13, the dropped newline counted); "é " * 100 truncated
    # to 7 pieces + </s>: ▁ é ▁ é ▁ é ▁ covers "é é é " up to the 4th space's piece = 4 x é + 3 spaces.
    assert first["text_bytes"].tolist()[:3] == [11, 13, len("é é é é".encode())]


def test_uint32_shards_read_back_the_same(folders, tokenizer, tokenizer_dir, tmp_path, monkeypatch):
    json_dir, token_dir = folders
    monkeypatch.setattr(pretokenize, "token_dtype", lambda vocab_size: "uint32")
    out = tmp_path / "wide"
    assert pretokenize.main(["--data_dir", str(json_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                             "--split", "train"]) == 0
    assert read_index(out, "train")["dtype"] == "uint32"
    (out / "validation").symlink_to(token_dir / "validation")  # a complete folder: eval split from the other
    kwargs = dict(tokenizer=tokenizer, max_length=8, batch_size=3, packing=True, shuffle_buffer=4)
    assert_same_batches(take(build_train_loader(data_dir=token_dir, **kwargs), 12),
                        take(build_train_loader(data_dir=out, **kwargs), 12))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("packing, workers, before", [(False, 0, 5), (True, 2, 9), (False, 2, 13)])
def test_resume_on_the_token_path_is_bit_identical(folders, tokenizer, packing, workers, before):
    _, token_dir = folders

    def make():
        return build_train_loader(tokenizer=tokenizer, data_dir=token_dir, max_length=8, batch_size=3,
                                  workers=workers, packing=packing, shuffle_buffer=8, seed=3)

    state = check_resume(make, before=before, after=6)  # 40 documents = 13.3 padded batches per epoch
    assert state["settings"]["data_format"] == "tokens"


def test_a_state_of_the_other_format_is_refused(folders, tokenizer):
    json_dir, token_dir = folders
    kwargs = dict(tokenizer=tokenizer, max_length=8, batch_size=3, shuffle_buffer=8)
    state = build_train_loader(data_dir=json_dir, **kwargs).state_dict()
    with pytest.raises(ValueError, match="'data_format': 'text'"):
        build_train_loader(data_dir=token_dir, **kwargs).load_state_dict(state)


# ----------------------------------------------------------------------------- errors: one line each


def copy_folder(source: Path, target: Path) -> Path:
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_bad_token_folders_fail_with_one_line(folders, tmp_path, tokenizer):
    _, token_dir = folders

    def error(folder, data_format="auto"):
        with pytest.raises(ValueError) as info:
            check_data_source(folder, data_format)
        assert "\n" not in str(info.value)
        return str(info.value)

    broken = copy_folder(token_dir, tmp_path / "broken")
    assert check_data_source(broken) == "tokens"
    (broken / "validation" / "index.json").unlink()  # an interrupted pretokenize leaves no index
    assert re.search(r"no validation split \(validation/index.json missing; write it with python -m "
                     r"train.pretokenize --split validation", error(broken))
    assert "is one split of a token folder: pass its parent folder" in error(broken / "train")
    assert "no train split" in error(tmp_path, "tokens")  # --data_format tokens on a folder without shards

    cut = copy_folder(token_dir, tmp_path / "cut")
    name = read_index(cut, "train")["shards"][0]["name"]
    tokens = cut / "train" / f"{name}.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    assert re.search(rf"train: {name}.tokens has \d+ bytes, the index says \d+$", error(cut))

    other = copy_folder(token_dir, tmp_path / "other")
    index = json.loads((other / "train" / "index.json").read_text())
    (other / "train" / "index.json").write_text(json.dumps({**index, "format": "something"}))
    assert "is not a apollo-token-shards version 1 index" in error(other)
    (other / "train" / "index.json").write_text(json.dumps({**index, "vocab_size": 99}))
    assert "train and validation were written with different tokenizers" in error(other)
    validation = json.loads((other / "validation" / "index.json").read_text())
    (other / "validation" / "index.json").write_text(json.dumps({**validation, "vocab_size": 99}))
    check_data_source(other)  # consistent files, but written with another tokenizer than the run's:
    with pytest.raises(ValueError, match="written with tokenizer .*this run's tokenizer"):
        build_train_loader(tokenizer=tokenizer, data_dir=other, max_length=8, batch_size=2)


def test_pretokenize_arguments_fail_with_one_line(folders, tmp_path, tokenizer_dir, capsys):
    json_dir, token_dir = folders

    def run(*argv):
        code = pretokenize.main(["--tokenizer", str(tokenizer_dir), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err
        return err

    assert run("--data_dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")) == \
        f"error: --data_dir {tmp_path / 'none'}: no such folder"
    assert "exists already; remove" in run("--data_dir", str(json_dir), "--out", str(token_dir))
    assert "no shards matching c4-train.*.json.gz" in run("--data_dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "--tokenizer:" in run("--data_dir", str(json_dir), "--out", str(tmp_path / "o"), "--tokenizer",
                                 str(tmp_path / "no_tokenizer"))


def test_trainer_exits_2_on_a_bad_token_folder(folders, tmp_path, tokenizer_dir, capsys):
    _, token_dir = folders
    broken = copy_folder(token_dir, tmp_path / "broken")
    (broken / "validation" / "index.json").unlink()
    config = Path(__file__).resolve().parents[2] / "configs" / "llama_9m.json"
    code = trainer_cli.main(["--model_config", str(config), "--data_dir", str(broken), "--tokenizer", str(tokenizer_dir),
                             "--batch_size", "2", "--wandb", "disabled", "--dry_run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --data_dir: token folder {broken}: no validation split "
                                 f"(validation/index.json missing; write it with python -m train.pretokenize "
                                 f"--split validation --out {broken})"]


# ----------------------------------------------------------------------------- the benchmark's derived A100 rate


def test_derived_a100_rate_of_llama_60m():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import loader_throughput

    flops, matmul = loader_throughput.training_flops_per_token(
        Path(__file__).resolve().parents[2] / "configs" / "llama_60m.json", 256)
    # 8 layers x (4 x 512^2 attention + 3 x 512 x 1376 MLP) + 32000 x 512 head; 12 x 8 x 256 x 512 attention
    assert matmul == 8 * (4 * 512 * 512 + 3 * 512 * 1376) + 32000 * 512 == 41_680_896
    assert flops == 6 * 41_680_896 + 12 * 8 * 256 * 512
    assert 0.4 * loader_throughput.A100_BF16_PEAK / flops == pytest.approx(475_124, rel=1e-5)


# ----------------------------------------------------------------------------- through the trainer


def test_a_run_on_token_shards_equals_the_run_on_json(folders, tokenizer_dir, tmp_path):
    """Two 3-update runs, json and token folder: the same losses, eval loss and bits per byte in metrics.jsonl."""
    from tests.train.test_data import TINY_LLAMA

    json_dir, token_dir = folders
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_LLAMA))
    metrics = {}
    for name, data_dir in (("json", json_dir), ("tokens", token_dir)):
        argv = ["--model_config", str(tmp_path / "tiny.json"), "--data_dir", str(data_dir), "--tokenizer",
                str(tokenizer_dir), "--max_length", "8", "--batch_size", "4", "--num_training_steps", "3",
                "--warmup_steps", "0", "--lr", "0.01", "--eval_tokens", "1000", "--workers", "0", "--dtype", "float32",
                "--wandb", "disabled", "--save_dir", str(tmp_path / name)]
        assert trainer_cli.main(argv) == 0
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        metrics[name] = ([m["loss"] for m in lines if "loss" in m], [m for m in lines if "eval/loss" in m][-1])
    assert len(metrics["json"][0]) == 3 and metrics["json"][0] == metrics["tokens"][0]
    (_, json_eval), (_, token_eval) = metrics["json"], metrics["tokens"]
    for key in ("eval/loss", "eval/perplexity", "eval/bits_per_byte", "eval/tokens", "eval/text_bytes"):
        assert json_eval[key] == token_eval[key], key
    nats = json_eval["eval/loss"] * json_eval["eval/tokens"]
    assert json_eval["eval/bits_per_byte"] == pytest.approx(nats / (math.log(2) * json_eval["eval/text_bytes"]), rel=1e-12)


def test_token_shards_map_ids_past_the_vocabulary_like_json(tmp_path, tokenizer_dir, tokenizer):
    """Shards keep the tokenizer's ids (32099 for <extra_id_0>); both loaders map them to <unk> for a vocab-32000
    model and count them alike, train and validation."""
    from tests.train.test_data import SENTINEL_TEXTS
    json_dir = write_shards(tmp_path / "json", [SENTINEL_TEXTS * 3], SENTINEL_TEXTS)
    assert pretokenize.main(["--data_dir", str(json_dir), "--tokenizer", str(tokenizer_dir),
                             "--out", str(tmp_path / "tokens")]) == 0
    loaders = [build_train_loader(tokenizer=tokenizer, data_dir=folder, max_length=16, batch_size=2, shuffle_buffer=1,
                                  vocab_size=32000) for folder in (json_dir, tmp_path / "tokens")]
    batches = [take(loader, 3) for loader in loaders]
    assert_same_batches(*batches)
    assert loaders[0].unk_mapped == loaders[1].unk_mapped == 4
    evals = [list(iter_eval_batches(tokenizer=tokenizer, data_dir=folder, max_length=16, batch_size=4, vocab_size=32000))
             for folder in (json_dir, tmp_path / "tokens")]
    assert [int(b["unk_mapped"]) for b in evals[0]] == [int(b["unk_mapped"]) for b in evals[1]] == [3]
