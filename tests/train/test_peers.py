"""Every peer optimizer through the whole harness: `python -m train --optimizer NAME` trains on the local C4
sample, logs its state bytes, saves, and resumes bit-exactly; the refusals are one line before anything exists."""
import json

import pytest
import torch

import apollo
from train import __main__ as cli
from tests.train.test_cli import read_metrics, tiny_args, weights

PEERS = {  # name: flags of a 4-update tiny run (lrs that train this model; not tuned)
    "fira": {"rank": 4, "update_proj_gap": 2, "fira_alpha": 0.25},
    "scale": {"lr": 0.003, "adam_lr": 0.01},
    "muon": {"lr": 0.02, "adam_lr": 0.003},
    "adam_mini": {"lr": 0.003},
    "soap": {"lr": 0.003, "soap_precondition_frequency": 2},
    "flora": {"rank": 4, "update_proj_gap": 2},  # kappa 2: the run saves at 2, right after its momenta moved
}


def _bitsandbytes_runs_here() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


if _bitsandbytes_runs_here():
    PEERS["adamw8bit"] = {"lr": 0.003}


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
    assert train[0]["optimizer_state_bytes"] > 0 or name == "scale"
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


def test_every_registered_optimizer_is_exercised_here_or_in_test_cli():
    covered = set(PEERS) | {"adamw", "apollo", "apollo_mini", "apollo_svd", "galore"}
    missing = set(apollo.optimizer_names()) - covered - ({"adamw8bit"} if not _bitsandbytes_runs_here() else set())
    assert not missing, missing


@pytest.mark.parametrize("flags, message", [
    ({"optimizer": "muon", "weight_quant": True}, "--weight_quant does not work with --optimizer muon"),
    ({"optimizer": "adam_mini", "fsdp": True}, "--fsdp shards over processes"),
    ({"optimizer": "soap", "weight_quant": True}, "--weight_quant does not work with --optimizer soap"),
    ({"optimizer": "adamw8bit", "weight_quant": True}, "--weight_quant does not work with --optimizer adamw8bit"),
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
