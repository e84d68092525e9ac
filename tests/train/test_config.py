"""TrainConfig and its CLI: flags map 1:1 to fields, derived values, and one-line errors for bad input."""
import dataclasses
import json

import pytest

import apollo
from apollo.spec import STANDARD_BETAS
from train import __main__ as cli
from train.optimizer_flags import FLAG_OPTIONS
from train.config import ConfigError, TrainConfig, build_parser, optimizer_options, parse_args, parse_tokens, resolve
from tests.train.test_cli import write_tiny_config

# The flags of the published LLaMA-60M APOLLO script (scripts/pretrain_c4/llama_60m_apollo.sh), verbatim.
PUBLISHED_60M_APOLLO = (
    "--model_config configs/llama_60m.json --eval_every 1000 --dtype bfloat16 --batch_size 256 --total_batch_size 512 "
    "--lr 0.01 --warmup_steps 1000 --num_training_steps 10000 --optimizer apollo_adamw --apollo_scale 1.0 --rank 128 "
    "--scale_type channel --proj random --update_proj_gap 200 --weight_decay 0 --project apollo_vis_new "
    "--name apollo_test_apollo_60m --save_dir ./ckpts/Appollo_60m_scale1.0_rank128_projrandom_typechannel"
).split()


def resolved(argv, world_size=1):
    config, warnings = resolve(parse_args(["--model_config", "m.json", *argv]), world_size)
    return config, warnings


def test_every_field_is_documented_and_has_its_flag():
    flags = {action.dest: action for action in build_parser()._actions}
    for spec in dataclasses.fields(TrainConfig):
        assert spec.metadata["help"], spec.name
        assert spec.name in flags, spec.name
        if spec.type in ("bool",):
            assert flags[spec.name].nargs == 0, f"--{spec.name} must be store_true"


def test_published_script_runs_unchanged():
    config, warnings = resolve(parse_args(PUBLISHED_60M_APOLLO), world_size=1)
    assert warnings == []
    assert (config.batch_size, config.gradient_accumulation, config.total_batch_size) == (256, 2, 512)
    assert config.optimizer == "apollo" and config.dtype == "bfloat16" and config.state_dtype == "float32"
    assert config.name == "apollo_test_apollo_60m"
    assert optimizer_options(config) == {"betas": (0.9, 0.999), "state_dtype": "float32", "rank": 128, "update_proj_gap": 200,
                                         "proj": "random", "scale_type": "channel", "scale": 1.0}
    json.dumps(config.to_dict())  # saved as config.json and wandb.config


@pytest.mark.parametrize("flags, expected", [
    ("--optimizer adamw --beta1 0.8 --beta2 0.95", {"betas": (0.8, 0.95)}),
    ("--optimizer adamw --eps 1e-6", {"betas": (0.9, 0.999), "eps": 1e-6}),
    ("--optimizer apollo_mini --apollo_scale 64 --scale_front", {"betas": (0.9, 0.999), "state_dtype": "float32", "scale": 64.0,
                                                                 "scale_front": True}),
    ("--optimizer galore_adamw --galore_scale 0.5 --rank 4 --state_dtype param", {"betas": (0.9, 0.999), "scale": 0.5, "rank": 4}),
    ("--optimizer apollo_svd --proj_type left", {"betas": (0.9, 0.999), "state_dtype": "float32", "proj_type": "left"}),
])
def test_optimizer_options_pass_only_what_was_set(flags, expected):
    config, _ = resolved(["--batch_size", "1", "--warmup_steps", "0", *flags.split()])
    assert optimizer_options(config) == expected


@pytest.mark.parametrize("flags, error", [
    ("--optimizer adamw --rank 128", "--rank does not apply to --optimizer adamw (it is used by "
                                     f"{', '.join(FLAG_OPTIONS['rank'])})"),  # the registry's takers, in its order
    ("--optimizer adamw --scale_front", "--scale_front does not apply to --optimizer adamw"),
    ("--optimizer apollo --galore_scale 0.25", "--galore_scale does not apply to --optimizer apollo (it is used by "
                                              f"{', '.join(FLAG_OPTIONS['galore_scale'])})"),  # galore, 8-bit GaLore
    ("--optimizer galore --apollo_scale 2", "--apollo_scale does not apply to --optimizer galore"),
    ("--optimizer apollo --fira_alpha 0.5", "--fira_alpha does not apply to --optimizer apollo (it is used by fira)"),
    ("--optimizer adamw --adam_lr 0.01", "--adam_lr does not apply to --optimizer adamw (it is used by scale, muon)"),
    ("--optimizer scale --muon_no_nesterov", "--muon_no_nesterov does not apply to --optimizer scale (it is used by muon)"),
    ("--optimizer muon --soap_precondition_frequency 5", "--soap_precondition_frequency does not apply to --optimizer muon"),
])
def test_flags_the_optimizer_does_not_take_are_refused(flags, error):
    with pytest.raises(ConfigError) as raised:
        resolved(["--batch_size", "1", "--warmup_steps", "0", *flags.split()])
    assert str(raised.value).startswith(error)


@pytest.mark.parametrize("name", [n for n in apollo.optimizer_names() if apollo.get_spec(n).states_follow_weights])
def test_state_dtype_float32_is_ignored_with_a_warning_where_states_follow_the_weights(name):
    config, warnings = resolved(["--batch_size", "1", "--warmup_steps", "0", "--optimizer", name, "--dtype", "bfloat16",
                                 "--state_dtype", "float32"])
    assert warnings == [f"--state_dtype float32 is ignored by {name}: its states follow the weights (bfloat16)"]
    assert config.state_dtype == "param"


def _set_value(flag):
    """A value of a declared optimizer `Flag` inside its domain and away from its default (so it is passed on)."""
    if flag.kind is bool:
        return True
    if flag.choices:
        return next(choice for choice in reversed(flag.choices) if choice != flag.default)
    low = flag.low if flag.low is not None else flag.above if flag.above is not None else 0
    high = flag.high if flag.high is not None else flag.below if flag.below is not None else low + 8
    value = flag.kind(low + (high - low) * 3 / 4) if flag.kind is float else max(low + 2, 2)
    return value if value != flag.default else flag.kind(value + (high - low) / 8 if flag.kind is float else value + 1)


@pytest.mark.parametrize("name", apollo.optimizer_names())
def test_every_flag_of_a_spec_reaches_its_option(name):
    """Every declared flag an optimizer takes, set at once away from its default, reaches the option its spec maps
    it to (negated where the spec says so: --muon_no_nesterov -> nesterov=False)."""
    spec = apollo.get_spec(name)
    declared = {flag.name: flag for s in apollo.REGISTRY.values() for flag in s.cli_flags}
    values = {flag: _set_value(declared[flag]) for flag in spec.flags if flag in declared}
    argv = [item for flag, value in values.items()
            for item in ([f"--{flag}"] if value is True else [f"--{flag}", str(value)])]
    config, _ = resolved(["--batch_size", "1", "--warmup_steps", "0", "--optimizer", name, *argv])
    options = optimizer_options(config)
    assert {spec.flags[flag]: options[spec.flags[flag]] for flag in values} == \
        {spec.flags[flag]: spec.flag_value(flag, value) for flag, value in values.items()}


@pytest.mark.parametrize("name", [n for n in apollo.optimizer_names() if apollo.get_spec(n).default_betas != STANDARD_BETAS])
def test_an_optimizer_takes_its_own_betas_unless_given(name):
    own = apollo.get_spec(name).default_betas
    config, _ = resolved(["--batch_size", "1", "--warmup_steps", "0", "--optimizer", name])
    assert (config.beta1, config.beta2) == own != STANDARD_BETAS
    config, _ = resolved(["--batch_size", "1", "--warmup_steps", "0", "--optimizer", name, "--beta2", "0.99"])
    assert (config.beta1, config.beta2) == (own[0], 0.99)


@pytest.mark.parametrize("batch, accum, total, world, expected", [
    (4, None, None, 1, (4, 1, 4)),
    (4, 3, None, 2, (4, 3, 24)),
    (4, None, 32, 2, (4, 4, 32)),
    (None, 2, 32, 2, (8, 2, 32)),
    (4, 2, 16, 2, (4, 2, 16)),
    (4, 2, 32, 2, "x --gradient_accumulation 2 x 2 processes = 16, not --total_batch_size 32"),
    (3, None, 32, 2, "--total_batch_size 32 is not a multiple of --batch_size 3 x 2 processes"),
    (None, 3, 32, 1, "--total_batch_size 32 is not divisible by --gradient_accumulation 3"),
    (None, None, 32, 1, "--batch_size (micro-batch per process) is required"),
])
def test_batch_arithmetic(batch, accum, total, world, expected):
    flags = [f"--{name} {value}" for name, value in
             (("batch_size", batch), ("gradient_accumulation", accum), ("total_batch_size", total)) if value is not None]
    argv = ["--warmup_steps", "0", *" ".join(flags).split()]
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            resolved(argv, world)
    else:
        config, _ = resolved(argv, world)
        assert (config.batch_size, config.gradient_accumulation, config.total_batch_size) == expected


@pytest.mark.parametrize("text, tokens", [("5000", 5000), ("100M", 100_000_000), ("1.3B", 1_300_000_000), ("2k", 2000),
                                          ("10_000", 10_000)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


def test_max_train_tokens_counts_tokens_per_update():
    config, _ = resolved("--batch_size 128 --total_batch_size 512 --max_length 256 --max_train_tokens 1.3B".split())
    assert config.num_training_steps == 1_300_000_000 // (512 * 256) == 9918


@pytest.mark.parametrize("flags, message", [
    ("--optimizer adafactor", "--optimizer: unknown optimizer 'adafactor'"),
    ("--optimizer apollo --rank 0", "--rank must be a positive integer, got 0"),
    ("--lr -0.1", "--lr must be >= 0, got -0.1"),
    ("--min_lr_ratio 1.5", r"--min_lr_ratio must be in \[0, 1\], got 1.5"),
    ("--warmup_steps 100 --num_training_steps 100", "--warmup_steps 100 must be smaller than --num_training_steps 100"),
    ("--eval_every 0", "--eval_every must be a positive integer"),
    ("--save_every -5", "--save_every must be a positive integer"),
    ("--beta2 1.0", r"--beta2 must be in \[0, 1\)"),
    ("--grad_clipping -1", "--grad_clipping must be >= 0"),
    ("--apollo_scale 0", "--apollo_scale must be > 0"),
    ("--max_train_tokens 100 --max_length 256", "--max_train_tokens 100 is less than one update"),
    ("--single_gpu", "--single_gpu runs one process, but 2 were launched"),
    ("--fsdp_mixed_precision", "--fsdp_mixed_precision needs --fsdp"),
    ("--fsdp --layerwise", "--fsdp does not combine with --layerwise"),
    ("--fsdp --optimizer apollo --weight_quant", "--fsdp does not combine with --weight_quant"),
    ("--fsdp --fsdp_mixed_precision --dtype bfloat16", "--fsdp_mixed_precision keeps float32 weights .* not bfloat16"),
    ("--fsdp --optimizer apollo_mini --dtype bfloat16", "--fsdp with apollo_mini needs the optimizer state in the "
                                                         "weights' dtype"),
])
def test_resolve_rejects(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolved(["--batch_size", "2", "--warmup_steps", "0", *flags.split()], world_size=2)


# -- through the CLI: exit code 2, one line on stderr, nothing built or written -------------------


@pytest.fixture()
def cli_args(tmp_path, c4_dir, tokenizer_dir, monkeypatch):
    """Valid flags for a tiny run; each case breaks one of them. Training itself must never start."""
    monkeypatch.setattr("train.loop.train", lambda *a, **k: pytest.fail("training started despite bad input"))
    config = write_tiny_config(tmp_path)
    return {"--model_config": str(config), "--data_dir": str(c4_dir), "--tokenizer": str(tokenizer_dir),
            "--batch_size": "2", "--num_training_steps": "4", "--warmup_steps": "1", "--max_length": "32",
            "--save_dir": str(tmp_path / "run"), "--wandb": "disabled"}


def bad_json(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2"}))
    return str(path)


BAD_INPUT = [  # (flag changes, expected text in the error line)
    ({"--optimizer": "sgd"}, f"--optimizer: unknown optimizer 'sgd'; choose one of: {', '.join(apollo.optimizer_names())}"),
    ({"--rank": "0", "--optimizer": next(n for n in apollo.optimizer_names() if "rank" in apollo.get_spec(n).flags)},
     "--rank must be a positive integer"),
    ({"--total_batch_size": "7"}, "--total_batch_size 7 is not a multiple of --batch_size 2"),
    ({"--model_config": "configs/llama_nope.json"}, "--model_config configs/llama_nope.json: no such file"),
    ({"--model_config": bad_json}, "not a llama config"),
    ({"--dtype": "float16"}, "argument --dtype: invalid choice: 'float16'"),
    ({"--continue_from": "no/such/run"}, "--continue_from: no/such/run does not exist"),
    ({"--continue_from": lambda tmp: str(tmp)}, "holds no checkpoint"),
    ({"--eval_every": "0"}, "--eval_every must be a positive integer"),
    ({"--save_every": "0"}, "--save_every must be a positive integer"),
    ({"--lr": "-1"}, "--lr must be >= 0"),
    ({"--min_lr_ratio": "2"}, "--min_lr_ratio must be in [0, 1]"),
    ({"--warmup_steps": "4"}, "--warmup_steps 4 must be smaller than --num_training_steps 4"),
    ({"--data_dir": "no/such/folder"}, "--data_dir: data_dir no/such/folder"),
    ({"--data_dir": lambda tmp: str(tmp)}, "--data_dir: data_dir "),
    ({"--tokenizer": "./no/such/tokenizer"}, "--tokenizer: tokenizer path ./no/such/tokenizer"),
    ({"--tokenizer": lambda tmp: str(tmp)}, "--tokenizer: tokenizer "),
    ({"--lr": "fast"}, "argument --lr: invalid float value: 'fast'"),
    ({"--max_train_tokens": "lots"}, "argument --max_train_tokens: 'lots' is not a token count"),
    ({"--not_a_flag": "1"}, "unrecognized arguments: --not_a_flag"),
    ({"--model_config": None}, "the following arguments are required: --model_config"),
]


@pytest.mark.parametrize("changes, message", BAD_INPUT, ids=[str(list(c.items())[0][0]) + str(i) for i, (c, _) in enumerate(BAD_INPUT)])
def test_cli_rejects_bad_input_with_one_line(changes, message, cli_args, tmp_path, capsys):
    args = dict(cli_args)
    for flag, value in changes.items():
        value = value(tmp_path) if callable(value) else value
        if value is None:
            args.pop(flag)
        else:
            args[flag] = value
    argv = [item for pair in args.items() for item in pair]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_cli_wants_a_wandb_login_for_online_mode(cli_args, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb/settings
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    argv = [item for pair in {**cli_args, "--wandb": "online"}.items() for item in pair]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb online needs a W&B login") and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_flag_the_optimizer_does_not_take(cli_args, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("train.loop.train", lambda config, ctx, tokenizer: 0)
    run_dir = tmp_path / "never-created"
    argv = [item for pair in {**cli_args, "--rank": "8", "--save_dir": str(run_dir)}.items() for item in pair]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --rank does not apply to --optimizer adamw") and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_fsdp_needs_several_processes():
    with pytest.raises(ConfigError, match="--fsdp shards over processes: launch with torchrun"):
        resolved(["--batch_size", "2", "--warmup_steps", "0", "--fsdp"], world_size=1)


def test_help_formats_every_flag_with_its_help_text():
    """argparse %-formats help strings: a help text with a bare '%' (e.g. "99.9%") made --help crash."""
    import dataclasses
    from train.config import TrainConfig, build_parser
    text = " ".join(build_parser().format_help().split())
    fields = dataclasses.fields(TrainConfig)
    assert len(fields) > 70
    for spec in fields:
        assert f"--{spec.name}" in text
    assert "99.9% of the factors' Adam moments" in text
