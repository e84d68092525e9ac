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


#: every optimizer flag the registered specs declare, by name
FLAGS = {flag.name: flag for spec in apollo.REGISTRY.values() for flag in spec.cli_flags}


def _inside(flag):
    """A value of `flag` inside its declared domain."""
    if flag.kind is bool:
        return True
    if flag.choices:
        return flag.choices[0]
    if flag.low is not None:
        return flag.low
    if flag.above is not None:
        step = 1 if flag.kind is int else (0.5 if flag.below is None else (flag.below - flag.above) / 2)
        return flag.above + step
    return flag.kind(1)


def _outside(flag):
    """Values of `flag` just outside its declared numeric domain: below its lower end, above its upper end."""
    step = 1 if flag.kind is int else 0.5
    lower = flag.low - step if flag.low is not None else flag.above
    upper = flag.high + step if flag.high is not None else flag.below
    return [value for value in (lower, upper) if value is not None]


def _refusal_cases():
    """(flags, message) from the specs: for every registered optimizer, a flag another spec declares that it does
    not take; for every declared flag with a numeric domain, a value just outside it given to an optimizer that
    takes it (its message: "must be <domain>, got <value>"). Then one single-process --fsdp run, and Muon's own
    refusal of bf16 weights without Nesterov (raised by its class, turned into one line by the CLI)."""
    cases = []
    for name, spec in apollo.REGISTRY.items():
        foreign = next((flag for flag in FLAGS.values() if flag.name not in spec.flags), None)
        if foreign is not None:
            cases.append(pytest.param({"optimizer": name, foreign.name: _inside(foreign)},
                                      f"--{foreign.name} does not apply to --optimizer {name}",
                                      id=f"{name}-not-{foreign.name}"))
    for flag in FLAGS.values():
        taker = next(name for name, spec in apollo.REGISTRY.items() if flag.name in spec.flags)
        for value in _outside(flag) if flag.kind in (int, float) else []:
            cases.append(pytest.param({"optimizer": taker, flag.name: value}, f"--{flag.name} must be ",
                                      id=f"{flag.name}-{value}"))
    cases.append(pytest.param({"fsdp": True}, "--fsdp shards over processes", id="fsdp-one-process"))
    cases.append(pytest.param({"optimizer": "muon", "dtype": "bfloat16", "muon_no_nesterov": True},
                              "--optimizer muon: ", id="muon-bf16-without-nesterov"))
    return cases


def test_the_refusal_cases_cover_every_optimizer_and_every_numeric_flag():
    ids = [case.id for case in _refusal_cases()]
    assert sum("-not-" in i for i in ids) == len(apollo.REGISTRY)  # no spec takes every flag
    assert {"rank-0", "adam_lr-0.0", "muon_momentum--0.5", "muon_momentum-1.0", "soap_precondition_frequency-0"} <= set(ids)


@pytest.mark.parametrize("flags, message", _refusal_cases())
def test_peer_refusals_are_one_line_and_create_nothing(flags, message, tmp_path, c4_dir, tokenizer_dir, capsys):
    run = tmp_path / "run"
    assert cli.main(tiny_args(tmp_path, c4_dir, tokenizer_dir, run, **flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    if message.endswith("must be "):  # the value refused is the one given
        assert err.endswith(f", got {next(v for k, v in flags.items() if k != 'optimizer')}"), err
    assert not run.exists()
