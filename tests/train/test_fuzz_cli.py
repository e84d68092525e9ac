"""Property-based: a wrong value for any CLI field exits 2 with one line on stderr, no traceback and no run folder.

The wrong values come from each TrainConfig field's domain, read from the field itself (its type, its
choices, its parser, the low/high/above/below of its `option`), so a field added later is fuzzed too:
wrong types, empty strings, control characters, NaN/inf, values past 64 bits, values just outside the
declared range, unknown choices, and for the path fields missing paths, folders where files belong and
files where folders belong. Each case runs parse + resolve + preflight in this process through the
entry function; a few run as real `python -m train` processes.
"""
import contextlib
import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apollo
import train.data
from tests.train.test_cli import REPO_ROOT, write_tiny_config
from train import __main__ as cli
from train.config import TrainConfig

FIELDS = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
CASES = {"run": 0}  # how many cases ran (printed at the end of the module)


def kind(name: str) -> type:
    hint = HINTS[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def refused_by(parser, text: str) -> bool:
    """Whether the field's own parser (int, float, parse_tokens) rejects `text`: only such text is a wrong type."""
    try:
        parser(text)
    except Exception:
        return True
    return False


def _valid_optimizer(text: str) -> bool:
    try:
        apollo.canonical_name(text)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory, c4_dir, tokenizer_dir):
    """The valid base flags and the folders the path strategies need."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a folder\n")
    (root / "gpt2.json").write_text(json.dumps({"model_type": "gpt2"}))
    base = {"model_config": str(write_tiny_config(root)), "data_dir": str(c4_dir), "tokenizer": str(tokenizer_dir),
            "batch_size": "2", "gradient_accumulation": "2", "num_training_steps": "6", "warmup_steps": "1",
            "max_length": "32", "workers": "0", "save_dir": str(root / "run"), "wandb": "disabled", "dtype": "float32"}
    with pytest.MonkeyPatch.context() as patch:  # the valid tokenizer once; failing loads run for real every time
        patch.setattr(train.data, "load_tokenizer", functools.lru_cache(maxsize=4)(train.data.load_tokenizer))
        yield {"root": root, "base": base}
    print(f"\nfuzz: {CASES['run']} wrong-value cases over {len(FIELDS)} fields")


def path_values(name: str, root: Path):
    """Wrong paths for the path fields: missing, a folder where a file belongs, a file where a folder belongs."""
    missing = st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True).map(lambda text: str(root / f"missing-{text}"))
    table = {
        "model_config": [missing, st.just(str(root / "empty")), st.just(str(root / "a-file")), st.just(str(root / "gpt2.json"))],
        "tokenizer": [missing.map(lambda p: p if p.startswith("/") else "./" + p), st.just(str(root / "empty")),
                      st.just(str(root / "a-file"))],
        "data_dir": [missing, st.just(str(root / "empty")), st.just(str(root / "a-file"))],
        "save_dir": [st.just(str(root / "a-file")), st.just(str(root / "a-file" / "run"))],
        "continue_from": [missing, st.just(str(root / "empty")), st.just(str(root / "a-file"))],
        "optimizer": [st.from_regex(r"[a-z_0-9]{1,16}", fullmatch=True).filter(lambda t: not _valid_optimizer(t))],
    }
    return table.get(name, [])


def bad_values(name: str, root: Path) -> st.SearchStrategy:
    """argv fragments that give field `name` a value outside its domain."""
    spec, flag = FIELDS[name], f"--{name}"
    meta, field_kind = spec.metadata, kind(name)
    as_value = lambda strategy: strategy.map(lambda text: [flag, str(text)])
    if field_kind is bool:
        return st.sampled_from([[flag, "yes"], [f"{flag}=1"], [flag, "0"], [f"{flag}=true"]])
    options = []
    if field_kind in (int, float):
        parser = meta.get("parse") or field_kind
        options.append(as_value(st.text(max_size=12).filter(lambda text: refused_by(parser, text))))
        options.append(as_value(st.sampled_from(["", " ", "1,5", "0x10", "ten", "1e", "--"])
                                .filter(lambda text: refused_by(parser, text))))
    if field_kind is int:
        options.append(as_value(st.integers(min_value=2**63, max_value=10**40) | st.integers(min_value=-(10**40),
                                                                                         max_value=-(2**63) - 1)))
        low, high = meta.get("low"), meta.get("high")
        if low is not None:
            options.append(as_value(st.integers(min_value=int(low) - 10**9, max_value=int(low) - 1)))
        if high is not None:
            options.append(as_value(st.integers(min_value=int(high) + 1, max_value=int(high) + 10**9)))
    if field_kind is float:
        options.append(as_value(st.sampled_from(["nan", "inf", "-inf", "1e999", "-1e999", "NaN", "Infinity"])))
        finite = dict(allow_nan=False, allow_infinity=False)
        for key, strategy in (("low", lambda v: st.floats(max_value=v, exclude_max=True, min_value=v - 1e6, **finite)),
                              ("above", lambda v: st.floats(max_value=v, min_value=v - 1e6, **finite)),
                              ("high", lambda v: st.floats(min_value=v, exclude_min=True, max_value=v + 1e6, **finite)),
                              ("below", lambda v: st.floats(min_value=v, max_value=v + 1e6, **finite))):
            if meta.get(key) is not None:
                options.append(as_value(strategy(meta[key]).map(repr)))
    if field_kind is str:
        choices = meta.get("choices")
        blank = st.sampled_from(["", " ", "\t"])
        control = st.tuples(st.text(max_size=5), st.sampled_from(["\n", "\r", "\x1b", "\x7f", "\t"]), st.text(max_size=5))
        options += [as_value(blank), as_value(control.map("".join))]
        if choices:
            options.append(as_value(st.text(min_size=1, max_size=12).filter(lambda text: text not in choices)))
        options += [as_value(strategy) for strategy in path_values(name, root)]
        if spec.default is dataclasses.MISSING:  # a required flag left out
            options.append(st.just([]))
    assert options, f"no wrong values for --{name}: teach bad_values its type {field_kind}"
    return st.one_of(options)


def run_main(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with mock.patch("train.loop.train", side_effect=AssertionError("training started")), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    CASES["run"] += 1
    return code, stderr.getvalue()


@pytest.mark.parametrize("name", list(FIELDS))
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_wrong_value_of_any_field_exits_2_with_one_line(name, data, world):
    fragment = data.draw(bad_values(name, world["root"]), label=f"--{name}")
    base = {key: value for key, value in world["base"].items() if key != name}
    argv = [item for key, value in base.items() for item in (f"--{key}", value)] + fragment
    folders_before = {p for p in world["root"].rglob("*") if p.is_dir()}
    code, err = run_main(argv)
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, (fragment, err)
    assert not Path(world["base"]["save_dir"]).exists()
    assert {p for p in world["root"].rglob("*") if p.is_dir()} == folders_before  # nor any other folder


def test_every_field_has_wrong_values(world):
    """A field whose type the strategies do not know fails here, not silently."""
    for name in FIELDS:
        bad_values(name, world["root"])


SUBPROCESS_CASES = [  # (flag changes, the error)
    ({"batch_size": "0"}, "error: --batch_size must be a positive integer, got 0"),
    ({"lr": "nan"}, "error: --lr must be a finite number, got nan"),
    ({"model_config": "HEADS"}, "hidden_size 30 is not divisible by num_attention_heads 4"),
]


def test_real_processes_exit_2_with_one_line(world):
    """Three `python -m train` processes at once: exactly one line on the real stderr, nothing else."""
    heads = world["root"] / "heads.json"
    heads.write_text(json.dumps({**json.loads(Path(world["base"]["model_config"]).read_text()), "hidden_size": 30,
                                 "num_attention_heads": 4, "num_key_value_heads": 4}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    processes = []
    for changes, _ in SUBPROCESS_CASES:
        flags = {**world["base"], **{key: str(heads) if value == "HEADS" else value for key, value in changes.items()}}
        argv = [item for key, value in flags.items() for item in (f"--{key}", value)]
        processes.append(subprocess.Popen([sys.executable, "-m", "train", *argv], cwd=REPO_ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process, (_, message) in zip(processes, SUBPROCESS_CASES):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2 and out == "", (process.returncode, out, err)
        assert len(err.splitlines()) == 1 and message in err, err
    assert not Path(world["base"]["save_dir"]).exists()
