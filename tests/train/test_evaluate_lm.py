"""python -m train.evaluate_lm: lm-eval's HFLM on a run, offline C4 bits per byte vs the harness's own.

Both values are re-derived in float64 from the exported model, each by its own definition (see
train/evaluate_lm.py): lm-eval scores every token of the (detokenised) document and the ``</s>`` the
tokenizer appends, after a ``</s>`` prefix; the harness scores the tokens after the first, ``</s>`` included.
Both divide by the UTF-8 bytes of the original texts, so their difference is the difference of the
two sums, which the test checks to float32 round-off.
"""
import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.train.test_export import hand_checkpoint
from train import evaluate_lm, export
from train.evaluate import evaluate

# short documents (under the tiny model's 64 positions: one lm-eval window, no harness truncation);
# the second has wikitext-style spacing that lm-eval's c4 detokeniser rewrites (" , " -> ", ").
DOCUMENTS = ["The quick brown fox jumps over the lazy dog.",
             "Café prices rose 3% in May , says the report ; nobody knows why.",
             "A second line\nwith a newline and the company's 2 things.",
             "Short one."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer_dir, c4_dir):
    """A 2-update checkpoint (tests.train.test_export.hand_checkpoint) and a C4 folder holding DOCUMENTS."""
    folder = tmp_path_factory.mktemp("evaluate-lm")
    hand_checkpoint(folder, tokenizer_dir)
    data = folder / "c4"
    data.mkdir()
    shutil.copy(next(c4_dir.glob("c4-train.*.json.gz")), data)  # train.data wants both splits present
    with gzip.open(data / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as handle:
        for text in DOCUMENTS:
            handle.write(json.dumps({"text": text, "timestamp": "", "url": ""}) + "\n")
    return folder


def nats(model, ids: list[int]) -> float:
    """-ln p(ids[1:] | ids[:-1]) summed, float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


def test_lm_eval_bits_per_byte_agrees_with_the_harness(tiny_run, tokenizer_dir, tmp_path, capsys):
    from lm_eval.tasks.c4.preprocess_c4 import c4_detokenizer

    output = tmp_path / "results.json"
    assert evaluate_lm.main([str(tiny_run / "run"), "--data_dir", str(tiny_run / "c4"), "--batch_size", "2",
                             "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    lm_eval_bpb = json.loads(output.read_text())["c4_local"]["bits_per_byte,none"]
    assert f"c4_local: " in printed and f"bits_per_byte {lm_eval_bpb:.6f}" in printed
    assert math.isfinite(lm_eval_bpb) and lm_eval_bpb > 0

    hf = export.export(tiny_run / "run", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = evaluate(AutoModelForCausalLM.from_pretrained(hf), tokenizer=tokenizer, data_dir=tiny_run / "c4",
                    max_length=64, batch_size=2, eval_tokens=10_000)

    eos = tokenizer.eos_token_id  # t5 has no BOS: lm-eval's HFLM prefixes </s>
    harness_nats = lm_eval_nats = 0.0
    text_bytes = 0
    for text in DOCUMENTS:
        ids = tokenizer(text).input_ids  # ... </s>: the harness's row
        assert ids[-1] == eos and len(ids) <= 64
        harness_nats += nats(model, ids)
        lm_eval_nats += nats(model, [eos] + tokenizer(c4_detokenizer({"text": text})).input_ids)
        text_bytes += len(text.encode("utf-8"))
    assert ours.text_bytes == text_bytes and ours.tokens == sum(len(tokenizer(t).input_ids) - 1 for t in DOCUMENTS)
    assert ours.bits_per_byte == pytest.approx(harness_nats / (math.log(2) * text_bytes), rel=1e-5)
    assert lm_eval_bpb == pytest.approx(lm_eval_nats / (math.log(2) * text_bytes), rel=1e-5)
    # the gap is the definitions' gap: the first token's term (after </s>) and the leading </s> context
    implied = (lm_eval_nats - harness_nats) / (math.log(2) * text_bytes)
    assert abs(implied) > 1e-3
    assert lm_eval_bpb - ours.bits_per_byte == pytest.approx(implied, rel=1e-4, abs=1e-5)


def test_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing"), "--data_dir", str(tiny_run / "c4")], "does not exist"),
        ([str(tiny_run / "run"), "--data_dir", str(tmp_path)], "no c4-validation.*.json.gz files there"),
        ([str(tiny_run / "run"), "--tasks", "c4_local"], "task c4_local reads --data_dir"),
        ([str(tiny_run / "run")], "give --tasks, or --data_dir"),
        ([str(tiny_run / "run"), "--data_dir", str(tiny_run / "c4"), "--batch_size", "0"], "--batch_size 0"),
    ]
    for argv, message in cases:
        assert evaluate_lm.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate_lm: ") and message in err[0], (argv, err)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow  # indexing lm-eval's ~15k task files takes 10-30 s
def test_uncached_standard_task_exits_2_offline(tiny_run, capsys):
    assert evaluate_lm.main([str(tiny_run / "run"), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load the data of hellaswag" in err[0] and "HF_DATASETS_OFFLINE=0" in err[0], err
    assert evaluate_lm.main([str(tiny_run / "run"), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err
