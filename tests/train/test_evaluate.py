"""train.evaluate: the token-weighted validation loss equals a direct computation over the same tokens.

The direct computation reads the validation shard with gzip/json (not datasets), tokenises each document
on its own and takes transformers' own per-document mean loss, so it shares no code with the evaluator
beyond the tokenizer and the model. Bits per byte: a uniform model on hand-counted texts, and each row's
bytes re-derived from the tokenizer's offsets.
"""
import gzip
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from train.data import iter_eval_batches, load_tokenizer
from train.evaluate import evaluate
from train.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def tiny_model(tokenizer):
    """2 layers of width 32; the vocab covers every id the t5 tokenizer can produce (32100 with extra ids)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, pad_token_id=0, use_cache=False,
    )
    torch.manual_seed(0)
    return build_model(config)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def small_dir(c4_dir, tmp_path_factory):
    """The first 24 validation documents of the C4 sample, as a data folder of their own."""
    folder = tmp_path_factory.mktemp("small_c4")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in validation_texts(c4_dir)[:24])
    (folder / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "c4-train.00000-of-00001.json.gz").write_bytes(gzip.compress(b'{"text": "unused"}\n'))
    return folder


def validation_texts(folder):
    texts = []
    for path in sorted(Path(folder).glob("c4-validation.*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def direct_loss(model, tokenizer, texts, *, batch_size, eval_tokens):
    """Per document: transformers' mean loss x its targets; stop after the batch that reaches eval_tokens."""
    total, targets = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            for text in texts[start : start + batch_size]:
                ids = torch.tensor([tokenizer(text, max_length=MAX_LENGTH, truncation=True)["input_ids"]])
                n = ids.shape[1] - 1
                if n > 0:
                    total += model(input_ids=ids, labels=ids).loss.double().item() * n
                    targets += n
            if targets >= eval_tokens:
                break
    return total / targets, targets


def test_loss_equals_direct_computation_over_the_same_tokens(model, tokenizer, c4_dir):
    result = evaluate(model, tokenizer=tokenizer, data_dir=c4_dir, max_length=MAX_LENGTH, batch_size=8, eval_tokens=700)
    loss, tokens = direct_loss(model, tokenizer, validation_texts(c4_dir), batch_size=8, eval_tokens=700)
    assert result.tokens == tokens
    assert 700 <= tokens < 700 + 8 * MAX_LENGTH  # stops at the first batch boundary past the budget
    assert abs(result.loss - loss) < 1e-6
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    assert abs(result.loss - math.log(len(tokenizer))) < 0.1  # an untrained model is near uniform


def test_whole_split_and_uneven_documents_are_token_weighted(model, tokenizer, tmp_path):
    # Documents of 3, 16 and 32 tokens in batches of one: a mean of batch means would weigh the
    # two targets of "Hello world" like the 31 of a full row.
    (tmp_path / "c4-train.00000-of-00001.json.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    texts = ["Hello world", "The cat sat on the mat and looked at the dog.", "a " * 100]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(lines.encode()))
    result = evaluate(model, tokenizer=tokenizer, data_dir=tmp_path, max_length=MAX_LENGTH, batch_size=1)
    loss, tokens = direct_loss(model, tokenizer, texts, batch_size=1, eval_tokens=10**9)
    assert result.tokens == tokens == sum(min(len(tokenizer(t)["input_ids"]), MAX_LENGTH) - 1 for t in texts)
    assert abs(result.loss - loss) < 1e-6
    batch_means = [direct_loss(model, tokenizer, [t], batch_size=1, eval_tokens=1)[0] for t in texts]
    assert abs(result.loss - sum(batch_means) / len(batch_means)) > 1e-3


def test_rank_shares_combine_to_the_single_process_result(model, tokenizer, small_dir):
    kwargs = dict(tokenizer=tokenizer, data_dir=small_dir, max_length=MAX_LENGTH, batch_size=5, eval_tokens=10**9)
    whole = evaluate(model, **kwargs)
    parts = [evaluate(model, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert whole.tokens == sum(p.tokens for p in parts)
    combined = sum(p.loss * p.tokens for p in parts) / whole.tokens
    assert abs(combined - whole.loss) < 1e-6  # other batch shapes: float32 rounding only
    assert parts[0].loss != parts[1].loss  # each rank really scored different documents
    assert whole.text_bytes == sum(p.text_bytes for p in parts)  # bits per byte: from the summed nats and bytes
    assert whole.bits_per_byte == pytest.approx(combined * whole.tokens / (math.log(2) * whole.text_bytes), rel=1e-6)


def test_train_or_eval_mode_is_restored(model, tokenizer, small_dir):
    kwargs = dict(tokenizer=tokenizer, data_dir=small_dir, max_length=MAX_LENGTH, batch_size=8, eval_tokens=10)
    model.train()
    first = evaluate(model, **kwargs)
    assert model.training
    model.eval()
    assert evaluate(model, **kwargs) == first  # same documents, same result, every run
    assert not model.training


def test_ranks_all_reduce_their_sums_not_their_means(model, tokenizer, small_dir, monkeypatch):
    """In-process stand-in for two ranks: rank 0's all_reduce adds rank 1's (loss sum, tokens)."""
    kwargs = dict(tokenizer=tokenizer, data_dir=small_dir, max_length=MAX_LENGTH, batch_size=5, eval_tokens=10**9)
    whole = evaluate(model, **kwargs)
    rank1_totals = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda totals: rank1_totals.append(totals.clone()))
    evaluate(model, rank=1, world_size=2, **kwargs)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda totals: totals.add_(rank1_totals[0]))
    result = evaluate(model, rank=0, world_size=2, **kwargs)
    assert result.tokens == whole.tokens
    assert abs(result.loss - whole.loss) < 1e-6


@pytest.mark.slow
def test_distributed_sums_are_all_reduced(model, tokenizer, small_dir, tokenizer_dir, tmp_path):
    """Two gloo processes: every rank returns the loss over both ranks' tokens, equal to one process's."""
    kwargs = dict(tokenizer=tokenizer, data_dir=small_dir, max_length=MAX_LENGTH, batch_size=5, eval_tokens=10**9)
    whole = evaluate(model, **kwargs)
    script = textwrap.dedent(
        f"""
        import json, sys, torch, torch.distributed as dist
        from tests.train.test_evaluate import tiny_model
        from train.data import iter_eval_batches, load_tokenizer
        from train.evaluate import evaluate
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        tokenizer = load_tokenizer({str(tokenizer_dir)!r})
        result = evaluate(tiny_model(tokenizer), tokenizer=tokenizer, data_dir={str(small_dir)!r},
                          max_length={MAX_LENGTH}, batch_size=5, eval_tokens=10**9, rank=rank, world_size=2)
        json.dump([result.loss, result.tokens], open(sys.argv[1] + f"/{{rank}}.json", "w"))
        dist.destroy_process_group()
        """
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, env={**env, "RANK": str(rank)})
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    for rank in range(2):
        loss, tokens = json.loads((tmp_path / f"{rank}.json").read_text())
        assert tokens == whole.tokens
        assert abs(loss - whole.loss) < 1e-6


def test_bad_eval_tokens(model, tokenizer, c4_dir):
    with pytest.raises(ValueError, match="eval_tokens 0"):
        evaluate(model, tokenizer=tokenizer, data_dir=c4_dir, max_length=MAX_LENGTH, batch_size=8, eval_tokens=0)


# ----------------------------------------------------------------------------- bits per byte


def write_validation(folder, texts):
    (folder / "c4-train.00000-of-00001.json.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (folder / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(lines.encode()))
    return folder


def test_bits_per_byte_of_a_uniform_model_by_hand(tokenizer, tmp_path):
    """A model whose logits are all 0 gives every target -ln p = ln V, so bits per byte = log2(V) x targets / bytes."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = ["Hello world", "é " * 100, "café au\nlait"]
    # Hello world: ▁Hello ▁world </s>           -> 2 targets, 11 bytes (the whole text)
    # "é " * 100: 201 ids truncated to 31 + </s> -> 31 targets; the kept pieces ▁ é ... ▁ end at character 31
    #                                              = 16 x "é" (2 bytes) + 15 spaces = 47 bytes
    # café au\nlait: ▁café ▁au ▁la it </s>       -> 4 targets, 13 bytes (é is 2; the dropped newline counts)
    targets, text_bytes = 2 + 31 + 4, 11 + 47 + 13
    result = evaluate(model, tokenizer=tokenizer, data_dir=write_validation(tmp_path, texts), max_length=MAX_LENGTH,
                      batch_size=2)
    assert (result.tokens, result.text_bytes) == (targets, text_bytes)
    assert result.loss == pytest.approx(math.log(32100), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(math.log2(32100) * targets / text_bytes, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / (math.log(2) * result.text_bytes), rel=1e-12)


def test_text_bytes_are_those_of_the_covered_text_on_c4(tokenizer, small_dir):
    """Each row's bytes, re-derived: the whole text if it fits, else the text up to the last kept piece's end."""
    texts = validation_texts(small_dir)
    expected = []
    for text in texts:
        full = tokenizer(text, return_offsets_mapping=True)
        if len(full["input_ids"]) <= MAX_LENGTH:
            expected.append(len(text.encode("utf-8")))
        else:
            expected.append(len(text[: full["offset_mapping"][MAX_LENGTH - 2][1]].encode("utf-8")))
    batches = list(iter_eval_batches(tokenizer=tokenizer, data_dir=small_dir, max_length=MAX_LENGTH, batch_size=5))
    assert torch.cat([b["text_bytes"] for b in batches]).tolist() == expected
    rows = [ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert rows == [tokenizer(t, max_length=MAX_LENGTH, truncation=True)["input_ids"] for t in texts]
    assert sum(len(tokenizer(t)["input_ids"]) > MAX_LENGTH for t in texts) >= 20  # truncation is the common case
