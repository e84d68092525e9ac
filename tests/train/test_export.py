"""python -m train.export: a run's checkpoint -> a from_pretrained folder with the run's logits (plain, int8, sharded)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import apollo
from tests.train.test_cli import run_train, tiny_args, write_tiny_config
from train import __main__ as cli
from train import export
from train.checkpoint import save_checkpoint
from train.config import TrainConfig
from train.model import build_model

BATCH = torch.randint(2, 32000, (2, 12), generator=torch.Generator().manual_seed(0))


def run_logits(checkpoint: Path, model_config: Path) -> torch.Tensor:
    """Logits of the run's own model (train.model.build_model + the checkpoint's safetensors) on BATCH."""
    model = build_model(model_config)
    load_model(model, checkpoint / "model.safetensors", strict=True)
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def exported_logits(folder: Path) -> tuple[torch.Tensor, torch.nn.Module]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=BATCH).logits, model


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, c4_dir, tokenizer_dir):
    """A real 2-update APOLLO run of the training CLI on the local C4 sample (about 15 s: slow tests only)."""
    folder = tmp_path_factory.mktemp("export-run")
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", optimizer="apollo", rank=4, num_training_steps=2,
                     save_every=2, eval_every=2)
    assert cli.main(argv) == 0
    return folder


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer_dir):
    """A plain checkpoint from save_checkpoint (seconds, no data loader); the folder holds llama_tiny.json and run/."""
    folder = tmp_path_factory.mktemp("export-plain")
    hand_checkpoint(folder, tokenizer_dir)
    return folder


def hand_checkpoint(folder: Path, tokenizer_dir: Path, **config_flags) -> Path:
    """A checkpoint written by train.checkpoint.save_checkpoint after 2 real updates, without the data loader.

    weight_quant: QuantLinear weights (apollo.quantize_model); fsdp: the torch.distributed.checkpoint layout
    (this one process writes every shard).
    """
    model_config = write_tiny_config(folder)
    config = TrainConfig(model_config=str(model_config), tokenizer=str(tokenizer_dir), dtype="float32", **config_flags)
    torch.manual_seed(0)
    model = build_model(model_config)
    if config.weight_quant:
        apollo.quantize_model(model, group_size=config.weight_group_size)
    optimizer = apollo.build_optimizer("apollo", model, lr=1e-2, rank=4)
    for _ in range(2):
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        logits = model(input_ids=BATCH).logits
    checkpoint = save_checkpoint(folder / "run", 2, model=model, optimizer=optimizer, trainer_state={"counters": {"step": 2}},
                                 rank_state={"step": 2}, config=config.to_dict(), sharded=config.fsdp)
    torch.save(logits, folder / "logits.pt")
    return checkpoint


@pytest.mark.parametrize("source", ["plain_run", pytest.param("cli_run", marks=pytest.mark.slow)])
def test_export_loads_with_the_run_logits(source, tokenizer_dir, tmp_path, request):
    run = request.getfixturevalue(source)
    out = tmp_path / "hf"
    assert export.main([str(run / "run"), "--out", str(out)]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    logits, model = exported_logits(out)
    expected = run_logits(run / "run" / "step_0000002", run / "llama_tiny.json")
    assert torch.equal(logits, expected)
    assert logits.shape == (2, 12, 32128) and model.dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["use_cache"] is True
    text = "The quick brown fox jumps over the lazy dog."
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tokenizer_dir)(text).input_ids
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


def test_bfloat16_export_is_the_run_model_in_bfloat16(plain_run, tmp_path):
    out = tmp_path / "bf16"
    assert export.main([str(plain_run / "run" / "step_0000002"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())
    logits, model = exported_logits(out)
    # the harness's bf16 model (built in bfloat16, RoPE tables as transformers makes them) with the run's weights rounded
    reference = build_model(plain_run / "llama_tiny.json", dtype="bfloat16")
    weights = load_file(plain_run / "run" / "step_0000002" / "model.safetensors")
    reference.load_state_dict({k: v.to(torch.bfloat16) for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        expected = reference(input_ids=BATCH).logits
    assert model.dtype == torch.bfloat16 and torch.equal(logits, expected)


def test_int8_checkpoint_is_dequantised(tmp_path, tokenizer_dir):
    checkpoint = hand_checkpoint(tmp_path, tokenizer_dir, weight_quant=True, weight_group_size=32)
    saved = load_file(checkpoint / "model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    out = tmp_path / "hf"
    assert export.main([str(tmp_path / "run"), "--out", str(out)]) == 0
    exported = load_file(out / "model.safetensors")
    assert not any(key.endswith(export.QUANT_BUFFERS) for key in exported)
    q, s, z = (saved[f"model.layers.1.mlp.down_proj.{k}"] for k in ("weight", "weight_scales", "weight_zeros"))
    by_hand = ((q.double().reshape(s.shape[0], -1) - z.double()) * s.double()).reshape(q.shape)  # (q - z) s per group
    torch.testing.assert_close(exported["model.layers.1.mlp.down_proj.weight"].double(), by_hand, rtol=1e-7, atol=0)
    logits, _ = exported_logits(out)
    assert torch.equal(logits, torch.load(tmp_path / "logits.pt"))  # the QuantLinear model's own forward


def test_sharded_checkpoint_is_consolidated(tmp_path, tokenizer_dir):
    checkpoint = hand_checkpoint(tmp_path, tokenizer_dir, fsdp=True)
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    out = tmp_path / "hf"
    assert export.main([str(checkpoint), "--out", str(out)]) == 0
    logits, _ = exported_logits(out)
    assert torch.equal(logits, torch.load(tmp_path / "logits.pt"))


@pytest.mark.slow
def test_fsdp_run_of_two_processes_exports(tmp_path, c4_dir, tokenizer_dir):
    run = tmp_path / "fsdp"
    run_train(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, fsdp=True, optimizer="apollo", rank=4, total_batch_size=8,
                        num_training_steps=2, save_every=2, eval_every=2), nproc=2)
    gathered = export.sharded_model_state(run / "step_0000002" / "sharded")
    out = tmp_path / "hf"
    assert export.main([str(run), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, gathered[key]), key


def test_bad_inputs_exit_2_with_one_line(plain_run, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "does not exist"),
        ([str(tmp_path), "--out", str(tmp_path / "b")], "holds no checkpoint"),
        ([str(plain_run / "run"), "--out", str(plain_run)], "is not an empty folder"),
        ([str(plain_run / "run"), "--out", str(tmp_path / "c"), "--model_config", str(tmp_path / "none.json")],
         "not found: pass --model_config"),
        ([str(plain_run / "run"), "--out", str(tmp_path / "d"), "--tokenizer", str(tmp_path)],
         "cannot load the tokenizer"),
    ]
    other = tmp_path / "other.json"  # a valid LLaMA config of another size: the weights do not fit it
    other.write_text(json.dumps({**json.loads((plain_run / "llama_tiny.json").read_text()), "num_hidden_layers": 3}))
    cases.append(([str(plain_run / "run"), "--out", str(tmp_path / "e"), "--model_config", str(other)],
                  "does not match its model config"))
    for argv, message in cases:
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("export: ") and message in err and "\n" not in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", "a", "b", "c", "d", "e"))]


def test_push_to_hub_only_when_asked(plain_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, repo_id, folder_path, **kw: calls.append(("upload", repo_id, folder_path)))
    assert export.main([str(plain_run / "run"), "--out", str(tmp_path / "a")]) == 0
    assert calls == []
    assert export.main([str(plain_run / "run"), "--out", str(tmp_path / "b"), "--push_to_hub", "me/tiny"]) == 0
    assert calls == [("create", "me/tiny"), ("upload", "me/tiny", str(tmp_path / "b"))]


def test_failed_push_exits_1_and_keeps_the_folder(plain_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(self, repo, **kwargs):  # what the client raises under HF_HUB_OFFLINE=1, without reaching for a network
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.\nsecond line")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    assert export.main([str(plain_run / "run"), "--out", str(tmp_path / "a"), "--push_to_hub", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "export: push to me/tiny failed (Cannot reach https://huggingface.co: offline mode is enabled.)" in err
    assert "second line" not in err and (tmp_path / "a" / "model.safetensors").is_file()
