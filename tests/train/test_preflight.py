"""The preflight: model config contents, data shards, tokenizer, run folder, resumed checkpoints and their settings.

Every case goes through `python -m train`'s entry function with the tiny LLaMA and the local C4 sample:
exit 2, exactly one line on stderr naming what to change, and no run folder; training never starts.
"""
import functools
import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import apollo
import train.data
from tests.train.test_cli import TINY_LLAMA, write_tiny_config
from train import __main__ as cli
from train.checkpoint import capture_rng, checkpoint_path, save_checkpoint
from train.config import ConfigError, parse_args, resolve
from train.model import build_model
from train.preflight import check_tokenizer


@pytest.fixture(autouse=True)
def cached_tokenizer(monkeypatch):
    """Load the t5 tokenizer once for the whole module (preflight loads it by name each time)."""
    monkeypatch.setattr(train.data, "load_tokenizer", _load_tokenizer)


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name):
    return train.data.AutoTokenizer.from_pretrained(str(name)) if Path(str(name)).is_dir() else _refuse(name)


def _refuse(name):
    raise ValueError(f"tokenizer path {name}: no such folder")


@pytest.fixture()
def base(tmp_path, c4_dir, tokenizer_dir, monkeypatch):
    """Flags of a valid tiny run; training is replaced by a recorder of the config it would run."""
    started = []
    monkeypatch.setattr("train.loop.train", lambda config, ctx, tokenizer: started.append(config) or 0)
    flags = {"--model_config": str(write_tiny_config(tmp_path)), "--data_dir": str(c4_dir), "--tokenizer": str(tokenizer_dir),
             "--batch_size": "2", "--gradient_accumulation": "2", "--num_training_steps": "6", "--warmup_steps": "1",
             "--max_length": "32", "--lr": "0.01", "--workers": "0", "--save_dir": str(tmp_path / "run"),
             "--wandb": "disabled", "--dtype": "float32"}
    return {"flags": flags, "started": started, "tmp": tmp_path}


def argv_of(flags: dict) -> list[str]:
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value is True else [flag, value]
    return argv


def refused(base, capsys, changes=None, *, run_dir=None) -> str:
    """Run the CLI with `changes`; assert exit 2, one line on stderr, no run folder, no training; return the line."""
    flags = {**base["flags"], **(changes or {})}
    flags = {key: value for key, value in flags.items() if value is not None}
    capsys.readouterr()
    assert cli.main(argv_of(flags)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not base["started"]
    run_dir = Path(run_dir or base["flags"]["--save_dir"])
    assert not run_dir.is_dir() or sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("step_")) in (
        [], ["config.json"]), "the run folder was written to"
    return err.strip()


def model_config(base, **changes) -> str:
    path = base["tmp"] / "model.json"
    path.write_text(json.dumps({key: value for key, value in {**TINY_LLAMA, **changes}.items() if value != "DELETE"}))
    return str(path)


# -- the model config's contents -----------------------------------------------------------------------

MODEL_CONFIGS = [  # (changes to the tiny LLaMA, the error)
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size 30 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer, got '2'"),
    ({"intermediate_size": -5}, "intermediate_size must be a positive integer, got -5"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"vocab_size": 1.5e4}, "vocab_size must be a positive integer, got 15000.0"),
    ({"head_dim": 7}, "the head dimension 7 is odd"),
    ({"hidden_size": 30, "num_attention_heads": 2}, "the head dimension 15 is odd"),
    ({"pad_token_id": 40000}, "pad_token_id 40000 is not a token id of the vocabulary (0 .. 32127)"),
    ({"eos_token_id": [1, -1]}, "eos_token_id -1 is not a token id"),
    ({"hidden_act": "swishy"}, "hidden_act 'swishy' is not an activation transformers knows"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number > 0, got 0"),
    ({"rope_theta": "big"}, "rope_theta must be a finite number > 0, got 'big'"),
    ({"attention_bias": "yes"}, "rejected by transformers: Validation error for field 'attention_bias'; TypeError: Field "
                                "'attention_bias' expected bool, got str"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rejected by transformers:"),
    ({"max_position_embeddings": 16}, "--max_length 32 exceeds max_position_embeddings 16 of --model_config"),
    ({"model_type": "DELETE"}, "not a llama config (model_type is None"),
]


@pytest.mark.parametrize("changes, message", MODEL_CONFIGS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(MODEL_CONFIGS)])
def test_the_model_config_contents_are_checked(changes, message, base, capsys):
    path = model_config(base, **changes)
    line = refused(base, capsys, {"--model_config": path})
    assert message in line and path in line, line


def test_a_model_config_that_is_not_json_or_is_a_folder(base, capsys):
    path = base["tmp"] / "broken.json"
    path.write_text('{"model_type": "llama",')
    assert "cannot read a json file" in refused(base, capsys, {"--model_config": str(path)})
    assert "a folder, not a json file" in refused(base, capsys, {"--model_config": str(base["tmp"])})


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(base, capsys):
    path = model_config(base, vocab_size=1000)
    line = refused(base, capsys, {"--model_config": path})
    assert f"has 32100 token ids but vocab_size of --model_config {path} is 1000: ids 1000..31999 would index past" in line


def test_only_special_ids_beyond_the_embedding_are_one_short_warning(base, capsys):
    """The published vocab-32000 configs with t5-base: ids 32000..32099 are <extra_id_*> special tokens."""
    path = model_config(base, vocab_size=32000)
    assert cli.main(argv_of({**base["flags"], "--model_config": path})) == 0
    err = capsys.readouterr().err
    assert "warning: token ids 32000..32099 (<extra_id_0> ...) read as <unk>; counted as data/unk_mapped_tokens" in err, err


def test_unknown_keys_of_a_model_config_are_a_warning(base, capsys):
    assert cli.main(argv_of({**base["flags"], "--model_config": model_config(base, hiden_size=64)})) == 0
    assert "unknown keys hiden_size (LlamaConfig ignores them; a typo?)" in capsys.readouterr().err


def test_a_tokenizer_without_pad_token_is_refused():
    class NoPad:
        pad_token_id = None

    with pytest.raises(ConfigError, match="--tokenizer gpt2 has no pad token"):
        check_tokenizer(NoPad(), "gpt2", vocab_size=100, model_config="m.json")


# -- the data ------------------------------------------------------------------------------------------


def data_dir(base, c4_dir, train_bytes=None, validation=True) -> Path:
    folder = base["tmp"] / "data"
    folder.mkdir()
    (folder / "c4-train.00000-of-01024.json.gz").write_bytes(train_bytes)
    if validation:
        shutil.copy(next(c4_dir.glob("c4-validation.*.json.gz")), folder)
    return folder


DATA = [  # (train shard bytes, the error)
    (b"plain text, not gzip", "c4-train.00000-of-01024.json.gz: cannot be read as gzip text"),
    (gzip.compress(b'{"url": "x"}\n'), "c4-train.00000-of-01024.json.gz: the first record has no string 'text' field "
                                       "(found ['url'])"),
    (gzip.compress(b'{"text": 5}\n'), "the first record has no string 'text' field"),
    (gzip.compress(b"not json\n"), "c4-train.00000-of-01024.json.gz: the first record is not json"),
    (gzip.compress(b""), "c4-train.00000-of-01024.json.gz: holds no records"),
    (gzip.compress(b'{"text": "ok"}\n')[:-12], "cannot be read as gzip text"),
]


@pytest.mark.parametrize("content, message", DATA, ids=range(len(DATA)))
def test_the_data_shards_are_read_and_their_first_record_checked(content, message, base, c4_dir, capsys):
    folder = data_dir(base, c4_dir, content)
    line = refused(base, capsys, {"--data_dir": str(folder)})
    assert line.startswith(f"error: --data_dir: {folder}/") and message in line, line


def test_missing_validation_shards_and_the_hub_while_offline(base, c4_dir, capsys, monkeypatch):
    folder = data_dir(base, c4_dir, gzip.compress(b'{"text": "ok"}\n'), validation=False)
    assert "no shards matching c4-validation.*.json.gz" in refused(base, capsys, {"--data_dir": str(folder)})
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert "--data_dir is unset, so C4 streams from the hub, but HF_DATASETS_OFFLINE is set" in refused(
        base, capsys, {"--data_dir": None})


# -- the run folder ------------------------------------------------------------------------------------


def test_the_run_folder_must_be_creatable(base, capsys):
    blocker = base["tmp"] / "a-file"
    blocker.write_text("x")
    assert f"{blocker} is a file, not a folder" in refused(base, capsys, {"--save_dir": str(blocker / "run")},
                                                          run_dir=blocker / "run")
    assert f"{blocker} is a file, not a folder" in refused(base, capsys, {"--save_dir": str(blocker)}, run_dir=blocker)


# -- resuming: the checkpoint and the settings ----------------------------------------------------------


@pytest.fixture()
def saved_run(base):
    """A run folder with a real tiny-LLaMA checkpoint after update 3, saved by the resolved config of `base`."""
    config, _ = resolve(parse_args(argv_of(base["flags"])), 1)
    torch.manual_seed(0)
    model = build_model(config.model_config, dtype="float32")
    optimizer = apollo.build_optimizer("adamw", model, lr=0.01)
    run = Path(config.save_dir)
    for step in (3,):
        save_checkpoint(run, step, model=model, optimizer=optimizer, config=config.to_dict(),
                        trainer_state={"counters": {"step": step, "tokens_seen": 0, "last_eval_step": -1,
                                                    "skipped_updates": 0}},
                        rank_state={"data": {}, "rng": capture_rng()})
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    return run


RESUME_REFUSED = [  # (command-line changes, the differing fields named as "--field saved -> given")
    ({"--lr": "0.02"}, ["--lr 0.01 -> 0.02"]),
    ({"--optimizer": "apollo", "--rank": "4"}, ["--optimizer 'adamw' -> 'apollo'", "--rank None -> 4",
                                                "--state_dtype 'param' -> 'float32'"]),
    ({"--workers": "2"}, ["--workers 0 -> 2"]),
    ({"--max_length": "16"}, ["--max_length 32 -> 16"]),
    ({"--seed": "1", "--data_seed": "7"}, ["--seed 0 -> 1", "--data_seed 42 -> 7"]),
    ({"--batch_size": "1", "--gradient_accumulation": "4"}, ["--batch_size 2 -> 1", "--gradient_accumulation 2 -> 4"]),
    ({"--packing": True, "--scheduler": "linear"}, ["--packing False -> True", "--scheduler 'cosine' -> 'linear'"]),
    ({"--warmup_steps": "2", "--min_lr_ratio": "0.2"}, ["--warmup_steps 1 -> 2", "--min_lr_ratio 0.1 -> 0.2"]),
]


@pytest.mark.parametrize("changes, named", RESUME_REFUSED, ids=[next(iter(c)) for c, _ in RESUME_REFUSED])
def test_a_resume_that_changes_the_training_is_refused_naming_every_field(changes, named, base, saved_run, capsys):
    line = refused(base, capsys, {**changes, "--continue_from": str(saved_run)})
    assert line.startswith(f"error: --continue_from {checkpoint_path(saved_run, 3)} was saved with other settings that "
                           "change the training: "), line
    listed = line.split("change the training: ")[1].split(" (checkpoint -> command line)")[0]
    for change in named:
        assert change in listed, (change, line)
    assert len(listed.split(", --")) == len(named), line  # no other field


def test_a_resume_may_change_the_allowed_settings_and_extend_the_schedule(base, saved_run, capsys):
    changes = {"--eval_every": "5", "--save_every": "1", "--log_every": "2", "--keep_last": "2", "--name": "again",
               "--num_training_steps": "10", "--eval_tokens": "100", "--continue_from": str(saved_run)}
    assert cli.main(argv_of({**base["flags"], **changes})) == 0
    err = capsys.readouterr().err
    assert "warning: resuming" in err and "--num_training_steps 6 -> 10" in err and "--eval_every 5000 -> 5" in err, err
    cosine = lambda k, n: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 1) / (n - 1)))  # warmup 1, min_lr_ratio 0.1
    assert (f"the cosine schedule is recomputed for 10 updates: the lr multiplier at update 3 goes from "
            f"{cosine(3, 6):.6g} to {cosine(3, 10):.6g}") in err, err
    (config,) = base["started"]
    assert config.continue_from == str(checkpoint_path(saved_run, 3)) and config.num_training_steps == 10


def test_a_resume_must_train_past_the_checkpoint(base, saved_run, capsys):
    line = refused(base, capsys, {"--num_training_steps": "3", "--continue_from": str(saved_run)})
    assert "--num_training_steps 3: the checkpoint" in line and "is at update 3 already" in line, line


def test_a_resume_with_another_number_of_processes_is_refused(base, saved_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = refused(base, capsys, {"--gradient_accumulation": "1", "--continue_from": str(saved_run)})
    assert "was written by 1 processes; resume it with 1, not 2" in line


def test_a_checkpoint_whose_shapes_do_not_fit_the_edited_model_config_is_refused(base, saved_run, capsys):
    Path(base["flags"]["--model_config"]).write_text(json.dumps({**TINY_LLAMA, "intermediate_size": 48}))
    line = refused(base, capsys, {"--continue_from": str(saved_run)})
    assert "model.safetensors: model.layers.0.mlp.gate_proj.weight has shape [64, 32], this model's is [48, 32]" in line


def test_a_damaged_newest_checkpoint_is_skipped_and_named(base, saved_run, capsys):
    shutil.copytree(checkpoint_path(saved_run, 3), checkpoint_path(saved_run, 6))
    damaged = checkpoint_path(saved_run, 6) / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert cli.main(argv_of({**base["flags"], "--continue_from": str(saved_run)})) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping damaged checkpoint: {damaged}: 100 bytes where the manifest says" in err, err
    assert base["started"].pop().continue_from == str(checkpoint_path(saved_run, 3))
    line = refused(base, capsys, {"--continue_from": str(checkpoint_path(saved_run, 6))})  # named explicitly: refused
    assert line.startswith(f"error: --continue_from: checkpoint {damaged}: 100 bytes"), line


def test_a_run_folder_holds_one_run(base, saved_run, capsys):
    line = refused(base, capsys, {"--resume": "never"})  # a new run into a folder with checkpoints
    assert f"--save_dir {saved_run} already holds checkpoints of a run (newest step_0000003): resume it with " \
           f"--continue_from {saved_run}" in line
    shutil.copytree(checkpoint_path(saved_run, 3), checkpoint_path(saved_run, 6))
    line = refused(base, capsys, {"--continue_from": str(checkpoint_path(saved_run, 3))})
    assert f"--save_dir {saved_run} holds step_0000006, newer than the checkpoint resumed (update 3)" in line, line


# -- a table of bad combinations, end to end ------------------------------------------------------------

COMBINATIONS = [  # (flags, world size, the error)
    ({"--warmup_steps": "6"}, 1, "--warmup_steps 6 must be smaller than --num_training_steps 6"),
    ({"--total_batch_size": "6"}, 1, "--batch_size 2 x --gradient_accumulation 2 x 1 process = 4, not --total_batch_size 6"),
    ({"--gradient_accumulation": None, "--total_batch_size": "6", "--batch_size": "4"}, 1,
     "--total_batch_size 6 is not a multiple of --batch_size 4"),
    ({"--max_train_tokens": "100"}, 1, "--max_train_tokens 100 is less than one update"),
    ({"--max_length": "128"}, 1, "--max_length 128 exceeds max_position_embeddings 64"),
    ({"--fsdp": True}, 1, "--fsdp shards over processes"),
    ({"--fsdp_mixed_precision": True}, 1, "--fsdp_mixed_precision needs --fsdp"),
    ({"--fsdp": True, "--layerwise": True, "--gradient_accumulation": "1"}, 2, "--fsdp does not combine with --layerwise"),
    ({"--layerwise": True}, 1, "gradients cannot be accumulated"),
    ({"--weight_quant": True}, 1, "--weight_quant"),
    ({"--weight_quant": True, "--optimizer": "apollo", "--weight_group_size": "7"}, 1, "--weight_group_size 7:"),
    ({"--optimizer": "apollo", "--rank": "64"}, 1, "--optimizer apollo:"),
    ({"--single_gpu": True, "--gradient_accumulation": "1"}, 2, "--single_gpu runs one process, but 2 were launched"),
    ({"--eval_batch_size": "0"}, 1, "--eval_batch_size must be a positive integer, got 0"),
    ({"--keep_last": "0"}, 1, "--keep_last must be a positive integer, got 0"),
    ({"--scheduler": "wsd", "--decay_fraction": "0.9", "--warmup_steps": "2"}, 1, "--scheduler wsd: the decay"),
    ({"--data_format": "tokens"}, 1, "--data_dir"),
    ({"--seed": str(2**32)}, 1, "--seed must be in [0, 4294967295], got 4294967296"),
    ({"--lr": "nan"}, 1, "--lr must be a finite number, got nan"),
    ({"--weight_decay": "1e999"}, 1, "--weight_decay must be a finite number, got inf"),
    ({"--max_train_tokens": "10000000000B"}, 1, "--max_train_tokens 10000000000000000000 does not fit in 64 bits"),
    ({"--name": ""}, 1, "--name must not be empty"),
    ({"--project": "a\nb"}, 1, "--project 'a\\nb' holds a control character"),
    ({"--replicate_degree": "2"}, 4, "--replicate_degree 2 builds an HSDP mesh for --fsdp; add --fsdp"),
    ({"--fsdp": True, "--replicate_degree": "3"}, 4, "--replicate_degree 3 must divide the 4 processes into replicas of at least 2"),
    ({"--fsdp": True, "--replicate_degree": "2"}, 2, "--replicate_degree 2 must divide the 2 processes into replicas of at least 2"),
]


@pytest.mark.parametrize("changes, world, message", COMBINATIONS, ids=[" ".join(c) for c, _, _ in COMBINATIONS])
def test_bad_combinations_exit_2_with_one_line(changes, world, message, base, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    line = refused(base, capsys, changes)
    assert message in line, line


# -- --resume auto: a restarted or requeued job runs the same command again ----------------------------------


def test_the_same_command_resumes_the_newest_checkpoint_with_one_line(base, saved_run, capsys):
    shutil.copytree(checkpoint_path(saved_run, 3), checkpoint_path(saved_run, 2))  # an older one is not chosen
    capsys.readouterr()
    assert cli.main(argv_of(base["flags"])) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"--resume auto: resuming {checkpoint_path(saved_run, 3)} at update 3 of 6 (same settings)"], err
    assert base["started"].pop().continue_from == str(checkpoint_path(saved_run, 3))


def test_the_same_folder_with_other_settings_is_refused_naming_the_fields(base, saved_run, capsys):
    line = refused(base, capsys, {"--lr": "0.02", "--seed": "1"})
    assert line == (f"error: --save_dir {saved_run} holds checkpoints of a run with other settings that change the "
                    "training: --lr 0.01 -> 0.02, --seed 0 -> 1 (checkpoint -> command line); run its command to resume "
                    "it, or choose another --save_dir"), line


def test_a_finished_run_started_again_exits_0_saying_it_is_complete(base, saved_run, capsys):
    capsys.readouterr()
    assert cli.main(argv_of({**base["flags"], "--num_training_steps": "3"})) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{saved_run}: the run is already complete (step_0000003, update 3 of 3); nothing to do"]
    assert not base["started"]


def test_resume_path_is_continue_from(base, saved_run, capsys):
    assert cli.main(argv_of({**base["flags"], "--resume": str(saved_run), "--save_dir": str(base["tmp"] / "again")})) == 0
    assert base["started"].pop().continue_from == str(checkpoint_path(saved_run, 3))
    line = refused(base, capsys, {"--resume": str(saved_run), "--continue_from": str(base["tmp"])})
    assert line == f"error: --resume {saved_run} and --continue_from {base['tmp']} name two checkpoints; give one of them"


def test_special_ids_past_the_embedding_without_an_unk_token_are_refused_in_one_line():
    """Ids past the embedding are read as <unk> (issue 25); a tokenizer without one cannot be: refused, one line."""
    from types import SimpleNamespace

    from train.preflight import ConfigError, check_tokenizer

    class Tokenizer(SimpleNamespace):
        def __len__(self):
            return 10

    special = SimpleNamespace(special=True)
    tokenizer = Tokenizer(pad_token_id=0, unk_token_id=None, added_tokens_decoder={8: special, 9: special})
    with pytest.raises(ConfigError) as error:
        check_tokenizer(tokenizer, "tok", vocab_size=8, model_config="tiny.json")
    assert str(error.value) == ("--tokenizer tok has 10 token ids, vocab_size of --model_config tiny.json is 8, and no "
                                "unk token to read ids 8..9 as; use a model config with vocab_size >= 10")
