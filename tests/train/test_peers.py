"""Every registered optimizer through the whole harness: `python -m train --optimizer NAME` trains on the local C4
sample, logs its state bytes, saves, and resumes bit-exactly; the refusals are one line before anything exists."""
import json

import pytest
import torch

import apollo
from train import __main__ as cli
from tests.train.test_cli import read_metrics, tiny_args, weights

#: name -> flags of a 4-update tiny run: every registered optimizer, with its spec's smoke flags
PEERS = {name: dict(apollo.get_spec(name).smoke_flags) for name in apollo.optimizer_names()}


@pytest.fixture(scope="module", params=sorted(PEERS))
def peer_run(request, tmp_path_factory, c4_dir, tokenizer_dir):
    """An uninterrupted 4-update run with checkpoints at 2 and 4, in this process."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    flags = {"optimizer": name, "num_training_steps": 4, "save_every": 2, "eval_every": 4, **PEERS[name]}
    argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / "run", **flags)
    assert cli.main(argv) == 0
    return {"name": name, "folder": folder, "run": folder / "run", "argv": argv}


def test_peer_trains_logs_and_resumes_bit_exactly(peer_run):
    run, name = peer_run["run"], peer_run["name"]
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[0]["optimizer_state_bytes"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == name
    for flag, value in PEERS[name].items():
        assert config[flag] == value, flag

    resumed = peer_run["folder"] / "resumed"
    argv = peer_run["argv"] + ["--continue_from", str(run / "step_0000002"), "--save_dir", str(resumed)]
    assert cli.main(argv) == 0
    expected, got = weights(run / "step_0000004"), weights(resumed / "step_0000004")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{name}: {key}"


def test_every_mode_a_spec_refuses_is_one_line_before_anything_exists(tmp_path, c4_dir, tokenizer_dir, capsys):
    """The refusals come from the specs (apollo.spec.OptimizerSpec.refuses): each is one line, exit 2."""
    cases = [(name, mode, reason) for name in apollo.optimizer_names()
             for mode, reason in apollo.get_spec(name).refuses.items()]
    assert len(cases) >= 5
    for name, mode, reason in cases:
        run = tmp_path / f"{name}-{mode}"
        assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, optimizer=name, **{mode: True})) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --{mode} does not work with --optimizer {name}: {reason}", err
        assert not run.exists()


@pytest.mark.parametrize("flags, message", [
    ({"optimizer": "adam_mini", "fsdp": True}, "--fsdp shards over processes"),
    ({"optimizer": "muon", "dtype": "bfloat16", "muon_no_nesterov": True}, "--optimizer muon: "),
    ({"optimizer": "apollo", "adam_lr": 0.01}, "--adam_lr does not apply to --optimizer apollo"),
    ({"optimizer": "fira", "scale_norm": "l2"}, "--scale_norm does not apply to --optimizer fira"),
    ({"optimizer": "scale", "adam_lr": -1.0}, "--adam_lr must be > 0"),
    ({"optimizer": "muon", "muon_momentum": 1.5}, "--muon_momentum must be in [0, 1)"),
    ({"optimizer": "soap", "soap_precondition_frequency": 0}, "--soap_precondition_frequency must be a positive integer"),
])
def test_peer_refusals_are_one_line_and_create_nothing(flags, message, tmp_path, c4_dir, tokenizer_dir, capsys):
    run = tmp_path / "run"
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not run.exists()
