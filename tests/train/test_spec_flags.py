"""The optimizer flags are generated from the specs' `apollo.spec.Flag`s: a new spec's flag is a --flag with its help,
its domain check and its way to the optimizer's options; shared flags are declared once."""
import dataclasses
import json
import subprocess
import sys

import pytest

import apollo
from apollo.projection import RANK
from apollo.spec import Flag, OptimizerSpec
from train import config as train_config
from train import optimizer_flags

# A toy optimizer registered in a fresh process before train.config is imported: it owns --toy_gamma and takes the
# low-rank family's --rank (the Flag object declared once in apollo/projection.py).
_TOY = r'''
import contextlib, io, json, runpy, sys
import torch
import apollo
from apollo.projection import RANK
from apollo.spec import Flag, OptimizerSpec

TOY_GAMMA = Flag("toy_gamma", float, "Toy: the decay gamma of its one buffer (default 0.5)", "gamma", above=0.0, below=1.0)
received = {}

def build(model, lr, weight_decay=0.0, **options):
    received.update(options)
    return torch.optim.SGD(model.parameters(), lr=lr)

apollo.register(OptimizerSpec("toy", build, {"gamma", "rank", "betas", "eps"}, "a toy optimizer",
                              cli_flags=(TOY_GAMMA, RANK), flag_help={"toy_gamma": "its only state's decay"}))

sys.argv = ["python -m train", "--help"]
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    runpy.run_module("train", run_name="__main__")

from train.config import ConfigError, optimizer_options, parse_args, resolve
base = ["--model_config", "m.json", "--batch_size", "2", "--warmup_steps", "0", "--num_training_steps", "4"]
config, _ = resolve(parse_args(base + ["--optimizer", "toy", "--toy_gamma", "0.25", "--rank", "3"]))
options = optimizer_options(config)
apollo.build_optimizer("toy", torch.nn.Linear(2, 2), lr=0.1, **{k: v for k, v in options.items() if k != "state_dtype"})
errors = []
for argv in (["--optimizer", "toy", "--toy_gamma", "1.5"], ["--optimizer", "adamw", "--toy_gamma", "0.25"]):
    try:
        resolve(parse_args(base + argv))
    except ConfigError as error:
        errors.append(str(error))
print(json.dumps({"help": help_text.getvalue(), "config": config.to_dict(), "received": received, "errors": errors}))
'''


def test_a_registered_spec_brings_its_flag_to_help_config_and_options(tmp_path):
    result = subprocess.run([sys.executable, "-c", _TOY], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.splitlines()[-1])
    help_text = " ".join(out["help"].split())  # argparse wraps lines
    assert "--toy_gamma TOY_GAMMA Toy: the decay gamma of its one buffer (default 0.5) [--optimizer toy: its only " \
           "state's decay]" in help_text
    # --rank's takers: every registered optimizer mapping it (read from the registry here), the toy appended last
    specs = [apollo.get_spec(n) for n in apollo.optimizer_names() if "rank" in apollo.get_spec(n).flags]
    plain = [s.name for s in specs if "rank" not in s.flag_help]
    notes = [f"{s.name}: {s.flag_help['rank']}" for s in specs if "rank" in s.flag_help]
    assert len(plain) >= 5 and notes
    assert f"[--optimizer {', '.join(plain)}, toy; {'; '.join(notes)}]" in help_text
    assert out["config"]["toy_gamma"] == 0.25 and out["config"]["rank"] == 3  # config.json keys
    assert out["received"] == {"gamma": 0.25, "rank": 3, "betas": [0.9, 0.999]}
    assert out["errors"] == ["--toy_gamma must be in (0, 1), got 1.5",
                             "--toy_gamma does not apply to --optimizer adamw (it is used by toy)"]


def test_generated_fields_keep_the_flags_declaration():
    fields = {f.name: f for f in dataclasses.fields(train_config.TrainConfig)}
    names = list(fields)
    declared = optimizer_flags.declared_flags()
    # in the optimizer section, right after --grad_clipping and before --state_dtype, in registration order
    start = names.index("grad_clipping") + 1
    assert names[start:start + len(declared)] == list(declared)
    assert names[start + len(declared)] == "state_dtype"
    rank = fields["rank"]
    assert (rank.default, rank.metadata["low"], rank.metadata["help"].split(" [")[0]) == (None, 1, RANK.help)
    assert fields["proj_type"].metadata["choices"] == ("std", "reverse_std", "left", "right")
    assert fields["muon_no_nesterov"].default is False
    assert apollo.get_spec("muon").flag_value("muon_no_nesterov", True) is False  # a negated Flag


def _spec(name, **fields):
    return OptimizerSpec(name, lambda model, lr, weight_decay=0.0, **options: None, {"rank", "gamma"}, "test", **fields)


def test_one_flag_declared_twice_differently_is_refused(monkeypatch):
    other_rank = dataclasses.replace(RANK, help="another rank")
    monkeypatch.setitem(apollo.REGISTRY, "dup", _spec("dup", cli_flags=(other_rank,)))
    with pytest.raises(ValueError, match=r"^optimizer flag --rank is declared twice, differently, by 'apollo' and 'dup'"):
        optimizer_flags.declared_flags()


def test_a_spec_may_map_a_flag_another_declares_but_not_an_undeclared_one(monkeypatch):
    monkeypatch.setitem(apollo.REGISTRY, "by_name", _spec("by_name", flags={"rank": "rank"}))
    assert optimizer_flags.declared_flags()["rank"] is RANK
    assert "by_name" in optimizer_flags.flag_help(RANK)
    monkeypatch.setitem(apollo.REGISTRY, "stray", _spec("stray", flags={"stray_gamma": "gamma"}))
    with pytest.raises(ValueError, match=r"^optimizer 'stray' maps flag\(s\) --stray_gamma that no spec declares"):
        optimizer_flags.declared_flags()


def test_a_flag_checks_its_own_declaration():
    with pytest.raises(ValueError, match="a bool flag is store_true"):
        Flag("x", bool, "x", "x", default=None)
    with pytest.raises(ValueError, match="only a bool flag can be negated"):
        Flag("x", int, "x", "x", negated=True)
