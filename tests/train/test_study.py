"""train.study: the spec parser and its one-line errors, the plan and commands of a small spec (times, SLURM
array), `from` stages and lr-edge extensions chosen from run folders, the power-law fit on synthetic data,
the speedup table, and a real 2-optimizer x 2-lr x 2-budget study of a tiny model (finishes, is skipped when
re-run, and its report's best rows match the run folders)."""
import dataclasses
import importlib
import json
import math
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import apollo
from apollo.spec import APOLLO_PAPER_60M
from train.optimizer_flags import FLAG_OPTIONS

from tests.train.test_cli import REPO_ROOT as REPO, write_tiny_config
from train import study
from train.study import report as study_report
from train.study import spec as study_spec
from train.__main__ import main as train_main
from train.model import build_model
from train.study.spec import StudyError, _resolve_run, load_spec


def spec_text(folder: Path, data_dir: Path, tokenizer: str = "t5-base", *, optimizers: str = "", stages: str = "",
              top: str = "", common: str = "") -> str:
    """A small spec: the tiny LLaMA, batch 2 x 32 tokens (64 per update); `optimizers`/`stages` replace the defaults."""
    config = write_tiny_config(folder)
    return f'''out = "{folder / 'study'}"
evals = 1
saves = 1
memory_device = "cpu"
{top}
[models]
tiny = "{config}"
[common]
data_dir = "{data_dir}"
tokenizer = "{tokenizer}"
max_length = 32
batch_size = 2
total_batch_size = 2
eval_tokens = 200
workers = 0
dtype = "float32"
wandb = "disabled"
scheduler = "wsd"
decay_fraction = 0.5
single_gpu = true
{common}
{optimizers or """[optimizers.adamw]
lr = [0.01, 0.003]
[optimizers.apollo_mini]
lr = [0.01, 0.003]
update_proj_gap = 2"""}
{stages or """[[stages]]
name = "tune"
budgets = [128, "64"]"""}
'''


def parse_flags(argv: list[str]) -> dict[str, str | bool]:
    """--flag value pairs and --switches of a trainer command."""
    flags, index = {}, 0
    while index < len(argv):
        has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        flags[argv[index]] = argv[index + 1] if has_value else True
        index += 2 if has_value else 1
    return flags


def write_spec(tmp_path: Path, **parts) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(spec_text(tmp_path, tmp_path, **parts))
    return path


# ------------------------------------------------------------------------------------------- the parser


BAD_SPECS = [
    (dict(top='colour = "red"'), "unknown key 'colour' (the spec's keys: common, evals, memory_device, models, "
                                "optimizers, out, saves, seeds, stages, warmup_fraction)"),
    (dict(optimizers="[optimizers.adamx]\nlr = [0.01]"),
     f"optimizers.adamx: unknown optimizer (one of {', '.join(apollo.optimizer_names())})"),  # the registry's
    (dict(optimizers="[optimizers.adamw]\nlr = [0.01]\nlearning_rate = 3"),
     "optimizers.adamw: unknown trainer flag 'learning_rate' (see python -m train --help)"),
    (dict(optimizers="[optimizers.adamw]\nlr = []"), "optimizers.adamw.lr: an empty grid"),
    (dict(optimizers="[optimizers.apollo]\nlr = [0.01]\nrank = []"), "optimizers.apollo.rank: an empty grid"),
    (dict(optimizers="[optimizers.adamw]\nweight_decay = 0.1"),
     "optimizers.adamw: needs an lr grid, e.g. lr = [1e-3, 2e-3, 4e-3]"),
    (dict(optimizers="[optimizers.adamw]\nlr = [0.01]\nrank = [2, 4]"),
     f"optimizers.adamw.rank: --rank does not apply to --optimizer adamw (it is used by "
     f"{', '.join(FLAG_OPTIONS['rank'])})"),
    (dict(common="muon_momentum = 0.9"),
     "common.muon_momentum: --muon_momentum does not apply to --optimizer adamw (it is used by muon)"),
    (dict(common="seed = 3"), "common: seed is set by the study for each run; leave it out"),
    (dict(common="lr = [0.1, 0.2]"), "common: lr is set by the study for each run; leave it out"),
    (dict(stages='[[stages]]\nname = "tune"\nbudgets = [63]'),
     "stages.tune: a budget of 63 tokens is smaller than one update of 64 tokens"),
    (dict(stages='[[stages]]\nname = "tune"\nbudgets = ["1x"]'),
     "stages.tune.budgets: '1x' is not a token count; write e.g. 5000, 100M or 1.3B"),
    (dict(stages='[[stages]]\nname = "tune"'), "stages.tune: give budgets or tokens_per_param (one of them)"),
    (dict(stages='[[stages]]\nname = "tune"\nbudgets = [64]\nmodels = ["huge"]'),
     "stages.tune.models: unknown 'huge' (the spec has tiny)"),
    (dict(stages='[[stages]]\nname = "tune"\nbudgets = [64]\noptimizers = ["galore"]'),
     "stages.tune.optimizers: unknown 'galore' (the spec has adamw, apollo_mini)"),
    (dict(stages='[[stages]]\nname = "a"\nbudgets = [64]\n[[stages]]\nname = "b"\nfrom = "c"'),
     "stages.b.from: 'c' is not an earlier stage"),
    (dict(stages='[[stages]]\nname = "a"\nbudgets = [64]\nrepeat = 2'),
     "stages.a: unknown key 'repeat' (a stage's keys: budgets, extend_edges, from, models, name, optimizers, seeds, "
     "tokens_per_param, top)"),
    (dict(common="warmup_steps = 1"),  # the 1-update budget of the default stage: the trainer's own check
     "run tiny-64-adamw-lr0.01-s0: --warmup_steps 1 must be smaller than --num_training_steps 1"),
    (dict(common='scheduler = "step"'),
     "[common] with model tiny: argument --scheduler: invalid choice: 'step' (choose from 'cosine', 'linear', "
     "'constant', 'wsd', 'cosine_restarts') (see python -m train --help)"),
]


@pytest.mark.parametrize("parts,message", BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_specs_exit_2_with_one_line_before_any_run(tmp_path, capsys, parts, message):
    spec = write_spec(tmp_path, **parts)
    if "common" in parts and "scheduler" in parts["common"]:  # a second scheduler line: replace the first instead
        spec.write_text(spec.read_text().replace('scheduler = "wsd"\n', "", 1))
    with pytest.raises(StudyError) as error:
        load_spec(spec)
    assert str(error.value) == message
    assert study.main([str(spec), "--print", "--rate", "100"]) == 2
    assert capsys.readouterr().err == f"study: {message}\n"
    assert not (tmp_path / "study").exists()  # nothing was created


def test_missing_files_and_bad_toml(tmp_path):
    spec = write_spec(tmp_path)
    text = spec.read_text()
    spec.write_text(text.replace(str(tmp_path / "llama_tiny.json"), str(tmp_path / "gone.json")))
    with pytest.raises(StudyError, match=re.escape(f"models.tiny: {tmp_path / 'gone.json'}: no such model config file")):
        load_spec(spec)
    spec.write_text(text.replace(f'data_dir = "{tmp_path}"', f'data_dir = "{tmp_path / "nodata"}"'))
    with pytest.raises(StudyError, match=re.escape(f"common.data_dir: {tmp_path / 'nodata'}: no such folder")):
        load_spec(spec)
    spec.write_text(text + "[[stages\n")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_spec(spec)
    with pytest.raises(StudyError, match="no such spec file"):
        load_spec(tmp_path / "none.toml")


# ------------------------------------------------------------------------------------------ the plan


def test_plan_commands_time_and_slurm_of_a_small_spec(tmp_path, capsys):
    spec_path = write_spec(tmp_path, top="seeds = [0, 1]\nwarmup_fraction = 0.25", optimizers="""[optimizers.adamw]
lr = [0.01, 0.003]
[optimizers.apollo]
lr = [0.01]
rank = [2, 4]
update_proj_gap = 3""", stages="""[[stages]]
name = "tune"
budgets = [512, 200]
[[stages]]
name = "big"
tokens_per_param = [0.001]
optimizers = ["adamw"]
seeds = [5]""")
    assert study.main([str(spec_path), "--print", "--rate", "1000", "--startup_s", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in out if not line.startswith("#")]
    # tune: (2 adamw lrs + 2 apollo ranks) x 2 budgets x 2 seeds; big: 1 budget x 2 lrs x 1 seed
    assert len(commands) == 16 + 2
    flags = [parse_flags(c[3:]) | {"argv": c} for c in commands]
    assert all(c[:3] == [sys.executable, "-m", "train"] for c in commands)
    first = flags[0]
    assert first["--name"] == "tiny-512-adamw-lr0.01-s0" and first["--save_dir"] == str(tmp_path / "study/runs" / first["--name"])
    # 512 tokens / 64 per update = 8 updates; warmup round(0.25 x 8) = 2; one evaluation, one save: every 8
    assert (first["--num_training_steps"], first["--warmup_steps"], first["--eval_every"], first["--save_every"]) == \
        ("8", "2", "8", "8")
    assert (first["--seed"], first["--data_seed"], first["--optimizer"], first["--lr"]) == ("0", "0", "adamw", "0.01")
    names = [f["--name"] for f in flags]
    assert names[:8] == ["tiny-512-adamw-lr0.01-s0", "tiny-512-adamw-lr0.01-s1", "tiny-512-adamw-lr0.003-s0",
                         "tiny-512-adamw-lr0.003-s1", "tiny-512-apollo-lr0.01-rank2-s0", "tiny-512-apollo-lr0.01-rank2-s1",
                         "tiny-512-apollo-lr0.01-rank4-s0", "tiny-512-apollo-lr0.01-rank4-s1"]
    apollo_run = flags[6]
    assert (apollo_run["--rank"], apollo_run["--update_proj_gap"], apollo_run["--lr"]) == ("4", "3", "0.01")
    # 200 tokens: 3 updates (192 tokens), warmup round(0.75) = 1
    assert flags[8]["--name"] == "tiny-200-adamw-lr0.01-s0"
    assert (flags[8]["--num_training_steps"], flags[8]["--warmup_steps"]) == ("3", "1")
    # tokens per parameter: 0.001 x the tiny model's parameters, in whole updates
    params = sum(p.numel() for p in build_model(str(tmp_path / "llama_tiny.json"), device="meta").parameters())
    big = [f for f in flags if f["--seed"] == "5"]
    assert len(big) == 2 and big[0]["--num_training_steps"] == str(round(0.001 * params) // 64)
    assert big[0]["--name"] == f"tiny-{study_spec._budget_label(round(0.001 * params))}-adamw-lr0.01-s5"
    # every command is what python -m train accepts (parses and resolves)
    for f in flags:
        assert study_spec._resolve_argv("x", f["argv"][3:]).num_training_steps == int(f["--num_training_steps"])
    # totals and time: 10 s start-up + tokens / 1000 + one evaluation of 200 tokens at 1/3 speed, per run
    tune_tokens = 8 * (8 * 64) + 8 * (3 * 64)
    big_tokens = 2 * int(big[0]["--num_training_steps"]) * 64
    seconds = 18 * (10 + 200 / 3000) + (tune_tokens + big_tokens) / 1000
    summary = next(line for line in out if line.startswith("# total:"))
    assert summary.startswith(f"# total: 18 runs, {tune_tokens + big_tokens:,} tokens, about {seconds / 3600:.2f} h")
    assert f"# stage tune: 16 runs (0 finished), {tune_tokens:,} tokens" in "\n".join(out)
    slurm = (tmp_path / "study" / "slurm.sh").read_text()
    assert f"j1=$(sbatch --parsable --array=0-15 {tmp_path / 'study/slurm.sh'} tune)" in slurm
    assert f"j2=$(sbatch --parsable --array=0-1 --dependency=afterany:$j1 {tmp_path / 'study/slurm.sh'} big)" in slurm
    assert slurm.splitlines()[-1] == (f'exec {sys.executable} -m train.study {spec_path} --stage "$1" '
                                      '--index "$SLURM_ARRAY_TASK_ID"')


# -------------------------------------------------- from-stages, edges and the report on written run folders


def fake_result(run, loss: float, state_bytes: int = 1000, rate: float = 50.0) -> None:
    """The run folder a finished run leaves for the report (config.json + metrics.jsonl), with a chosen final loss."""
    config = _resolve_run(run).to_dict()
    run.directory.mkdir(parents=True)
    (run.directory / "config.json").write_text(json.dumps(config))
    steps, per_update = config["num_training_steps"], config["total_batch_size"] * config["max_length"]
    records = [{"step": s, "loss": loss + 1.0 / s, "tokens_seen": s * per_update, "throughput_tokens": rate}
               for s in range(1, steps + 1)]
    records[0]["optimizer_state_bytes"] = state_bytes
    # a mid-run evaluation lower than the final one: the report must take the final one
    records.insert(steps // 2, {"step": steps // 2, "eval/loss": loss - 0.5, "eval/perplexity": math.exp(loss - 0.5),
                                "eval/bits_per_byte": 0.1})
    records.append({"step": steps, "eval/loss": loss, "eval/perplexity": math.exp(loss),
                    "eval/bits_per_byte": loss / math.log(2) / 4.0})
    (run.directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_from_stage_takes_the_best_configuration_and_edges_are_extended(tmp_path):
    spec = load_spec(write_spec(tmp_path, optimizers="""[optimizers.adamw]
lr = [0.001, 0.002, 0.004]
[optimizers.apollo]
lr = [0.001, 0.002]
rank = [2, 4]""", stages="""[[stages]]
name = "tune"
budgets = [128]
seeds = [0, 1]
extend_edges = 2
[[stages]]
name = "again"
from = "tune"
top = 2
seeds = [7]"""))
    settled = lambda run: run.directory.is_dir()  # noqa: E731  (over = its folder exists)
    planned, pending = study.plan(spec, settled)
    assert len(planned["tune"]) == (3 + 4) * 2 and planned["again"] == []
    assert pending["again"] == "4 runs chosen from stage tune once its 14 runs are over"
    # adamw: lr 0.004 best on the mean of both seeds (an edge); apollo: best lr 0.002 (an edge), rank 2 better
    losses = {("adamw", 0.001): (5.0, 5.2), ("adamw", 0.002): (4.8, 4.6), ("adamw", 0.004): (4.5, 4.7),
              ("apollo", 0.001, 2): (4.9, 4.9), ("apollo", 0.002, 2): (4.4, 4.6), ("apollo", 0.001, 4): (5.5, 5.5),
              ("apollo", 0.002, 4): (4.95, 4.95)}
    for run in planned["tune"]:
        key = (run.optimizer, run.settings["lr"]) + ((run.settings["rank"],) if "rank" in run.settings else ())
        fake_result(run, losses[key][run.seed])
    planned, pending = study.plan(spec, lambda run: run.directory.is_dir())
    extra = planned["tune"][14:]
    # one lr beyond each edge, at the grid's ratio, for each seed: adamw 0.008; apollo 0.004 at ranks 2 and 4
    assert sorted((r.optimizer, r.settings["lr"], r.settings.get("rank"), r.seed) for r in extra) == [
        ("adamw", 0.008, None, 0), ("adamw", 0.008, None, 1), ("apollo", 0.004, 2, 0), ("apollo", 0.004, 2, 1),
        ("apollo", 0.004, 4, 0), ("apollo", 0.004, 4, 1)]
    assert "tune" in pending and planned["again"] == []  # the extensions are not over yet
    for run in extra:  # adamw's 0.008 is worse (the edge is now inside); apollo's 0.004 better again at rank 2
        fake_result(run, 4.9 if run.optimizer == "adamw" else 4.3 if run.settings["rank"] == 2 else 6.0)
    planned, pending = study.plan(spec, lambda run: run.directory.is_dir())
    second = planned["tune"][20:]
    assert sorted((r.optimizer, r.settings["lr"], r.settings["rank"], r.seed) for r in second) == [
        ("apollo", 0.008, 2, 0), ("apollo", 0.008, 2, 1)]
    for run in second:
        fake_result(run, 4.35)
    planned, pending = study.plan(spec, lambda run: run.directory.is_dir())
    assert len(planned["tune"]) == 22 and "tune" not in pending  # extend_edges = 2: no third extension
    # the top 2 configurations per optimizer, by the mean over seeds 0 and 1, re-run at seed 7
    chosen = [(r.optimizer, r.settings["lr"], r.settings.get("rank"), r.seed, r.name) for r in planned["again"]]
    assert chosen == [("adamw", 0.004, None, 7, "tiny-128-adamw-lr0.004-s7"),
                      ("adamw", 0.002, None, 7, "tiny-128-adamw-lr0.002-s7"),
                      ("apollo", 0.004, 2, 7, "tiny-128-apollo-lr0.004-rank2-s7"),
                      ("apollo", 0.008, 2, 7, "tiny-128-apollo-lr0.008-rank2-s7")]


def test_old_module_paths_are_deprecated_aliases_of_the_package_modules(monkeypatch):
    """train.study_spec / train.study_report (train/study/ was three modules) import as the same module objects."""
    for old, new in (("train.study_spec", study_spec), ("train.study_report", study_report)):
        monkeypatch.delitem(sys.modules, old, raising=False)
        with pytest.deprecated_call(match=rf"^{old} is deprecated: import {new.__name__}"):
            assert importlib.import_module(old) is new
    assert study.report is study_report and study.fit_power_law is study_report.fit_power_law
    assert study.load_spec is study_spec.load_spec and study.main.__module__ == "train.study.run"

def test_power_law_fit_recovers_known_parameters():
    tokens = [1e5, 3e5, 1e6, 3e6, 1e7]
    alpha, exponent, beta = 50.0, 0.3, 2.0
    fit = study_report.fit_power_law(tokens, [alpha * d ** -exponent + beta for d in tokens])
    assert fit.alpha == pytest.approx(alpha, rel=1e-6) and fit.exponent == pytest.approx(exponent, rel=1e-6)
    assert fit.beta == pytest.approx(beta, rel=1e-6)
    assert max(abs(r) for r in fit.residuals) < 1e-9
    assert fit.tokens_for(alpha * 2e6 ** -exponent + beta) == pytest.approx(2e6, rel=1e-5)
    assert fit.tokens_for(fit.beta) == math.inf and fit.tokens_for(1.0) == math.inf
    # three budgets: the law is still recovered (three parameters, exact); noisy data: residuals sum to ~0 in L
    three = study_report.fit_power_law([1e5, 2e5, 4e5], [5.0 + 30 * d ** -0.25 for d in (1e5, 2e5, 4e5)])
    assert (three.alpha, three.exponent, three.beta) == pytest.approx((30.0, 0.25, 5.0), rel=1e-6)
    noisy = [alpha * d ** -exponent + beta + e for d, e in zip(tokens, (0.01, -0.02, 0.015, -0.01, 0.005))]
    rough = study_report.fit_power_law(tokens, noisy)
    assert 1.8 < rough.beta < 2.2 and sum(r * r for r in rough.residuals) < sum(e * e for e in (0.01, -0.02, 0.015, -0.01, 0.005))
    with pytest.raises(ValueError, match="the fit needs losses at 3 or more distinct budgets, got 2"):
        study_report.fit_power_law([1e5, 2e5], [3.0, 2.9])


def test_report_speedup_against_a_known_adamw_law(tmp_path):
    """AdamW at 3 budgets on L(D) = 20 D^-0.5 + 3; APOLLO-Mini at the middle budget about reaches AdamW's loss
    at 4x its tokens. Its best lr (seed 0) is re-run at seed 1, a little worse: it stays the best configuration
    (ranked on the shared seed 0), though its 2-seed mean is above the other lr's one-seed loss."""
    spec = load_spec(write_spec(tmp_path, stages="""[[stages]]
name = "adamw"
budgets = [640, 2560, 10240]
optimizers = ["adamw"]
[[stages]]
name = "mini"
budgets = [2560]
optimizers = ["apollo_mini"]
[[stages]]
name = "mini_seed"
from = "mini"
seeds = [1]"""))
    law = lambda d: 20 * d ** -0.5 + 3  # noqa: E731
    target = law(4 * 2560)
    planned, _ = study.plan(spec, lambda run: True)
    for run in planned["adamw"]:
        fake_result(run, law(run.tokens) + (0.0 if run.settings["lr"] == 0.01 else 0.5))
    for run in planned["mini"]:
        fake_result(run, target if run.settings["lr"] == 0.003 else target + 0.0005, state_bytes=3 * 2**20)
    planned, _ = study.plan(spec, lambda run: True)
    assert [r.name for r in planned["mini_seed"]] == ["tiny-2.56K-apollo_mini-lr0.003-s1"]
    fake_result(planned["mini_seed"][0], target + 0.002, state_bytes=3 * 2**20)
    report = study_report.write_report(spec.out, memory_device="cpu").read_text()

    losses = [target, target + 0.002]
    loss = sum(losses) / 2  # the final evaluations (not the lower mid-run ones), mean over the 2 seeds
    mini_row = next(line for line in report.splitlines() if line.startswith("| apollo_mini |"))
    ppl, bpb = sum(map(math.exp, losses)) / 2, loss / math.log(2) / 4
    assert mini_row.startswith(f"| apollo_mini | lr 0.003 | 2 | {loss:.4f} | {ppl:.2f} | {bpb:.4f} | 3.00 |")
    speedup = report.split("## Speedup in tokens over AdamW")[1]
    assert "L(D) = 20 D^-0.5 + 3 (3 points, 3 parameters" in speedup
    d_adamw = (20 / (loss - 3)) ** 2
    assert f"| apollo_mini | 2,560 | {loss:.4f} | {d_adamw:,.0f} | {d_adamw / 2560:.2f}x |" in speedup
    assert 3.9 < d_adamw / 2560 < 4.0
    assert "| adamw | 2,560 | " in speedup and "| 2,560 | 1.00x |" in speedup  # AdamW against its own fit
    assert "apollo_mini: best lr 0.003 is the smallest of 0.003, 0.01: widen the grid" in report
    assert f"| 0: {target:.4f}, 1: {target + 0.002:.4f} |" in report.split("## Seeds")[1]
    for png in ("speedup_llama_tiny.png", "sensitivity.png", "curves_llama_tiny_2.56K.png"):
        with Image.open(spec.out / png) as image:
            image.verify()
    # the published perplexities (from the specs' `published`, train.study.report.reported): the lines as they
    # were when train/study/report.py held them in a dict, each followed by the same optimizers measured here
    measured = (f"  - the same optimizers at llama_tiny 2.56K (measured): apollo_mini {ppl:.2f} < "
                f"adamw {math.exp(law(2560)):.2f}")
    reported = report.split("## Published numbers for reference (reported, not run here)\n\n")[1].split("\n\n")[0]
    assert reported.splitlines() == [
        "- APOLLO paper, LLaMA-60M, 10K updates of 512 x 256 tokens (PROTOCOL.md), validation perplexity (reported): "
        "fira 31.06 < apollo_svd 31.26 < apollo 31.55 < apollo_mini 31.93 < adamw 34.06 < galore 34.88", measured,
        "- SCALE repository's runs, LLaMA-60M, 11K updates (PEERS.md), validation perplexity (reported): "
        "muon 28.86 < adamw 30.05 < fira 30.34 < scale 30.81 < apollo 30.94 < apollo_mini 31.85 < galore 34.58",
        measured,
        "- Adam-mini paper, 67M, torchtitan Chinchilla tokens (PEERS.md), validation perplexity (reported): "
        "adam_mini 29.01 < adamw 29.32"]


def test_reported_numbers_are_gathered_from_the_specs(monkeypatch):
    """A spec registered with `published` perplexities is in the report's reference lines: in an existing
    source's ordering and as a new source of its own; a perplexity <= 1 is refused when the spec is made."""
    mine = dataclasses.replace(apollo.get_spec(apollo.BASELINE), name="mine", aliases=(),
                               published={APOLLO_PAPER_60M: 31.5, "A new paper, 1B": 20.25})
    monkeypatch.setitem(apollo.REGISTRY, "mine", mine)
    lines = study_report.reported_section({})
    assert lines[2] == (f"- {APOLLO_PAPER_60M}, validation perplexity (reported): fira 31.06 < apollo_svd 31.26 < "
                        "mine 31.50 < apollo 31.55 < apollo_mini 31.93 < adamw 34.06 < galore 34.88")
    assert lines[-2] == "- A new paper, 1B, validation perplexity (reported): mine 20.25"
    assert study_report.REPORTED["A new paper, 1B"] == {"mine": 20.25}
    with pytest.raises(ValueError, match=r"'bad': published perplexities must be > 1, not at \['p'\]"):
        dataclasses.replace(mine, name="bad", published={"p": 0.5})


def test_estimated_time_is_tokens_evaluations_and_start_up(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    runs = study.plan(spec, lambda run: False)[0]["tune"]
    rates = {("tiny", "adamw"): 10.0, ("tiny", "apollo_mini"): 5.0}
    # 4 runs of 2 updates (128 tokens) and 4 of 1 (64), one evaluation of 200 tokens each at a third of the rate
    expected = sum(7 + tokens / rate + 200 / (3 * rate) for tokens in (128, 64) for rate in (10, 10, 5, 5))
    assert study.estimate_seconds(runs, rates, startup_s=7) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------- a real study


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, c4_dir, tokenizer_dir):
    """The C4 sample as token shards (no tokenising in every run)."""
    from train import pretokenize

    out = tmp_path_factory.mktemp("tokens") / "c4"
    assert pretokenize.main(["--data_dir", str(c4_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_study_finishes_is_skipped_when_rerun_and_reports_the_run_folders(tmp_path, token_dir, tokenizer_dir,
                                                                            capsys, one_thread):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(spec_text(tmp_path, token_dir, str(tokenizer_dir)))
    spec = load_spec(spec_path)
    launched = []

    def launch(cmd):  # python -m train in this process (start-up once)
        assert cmd[:3] == [sys.executable, "-m", "train"]
        launched.append(cmd)
        return train_main(cmd[3:])

    assert study.run_study(spec, launch=launch) == 0
    runs = sorted(p.name for p in (spec.out / "runs").iterdir())
    assert len(launched) == 8 and runs == sorted(
        f"tiny-{b}-{o}-lr{lr}-s0" for b in (64, 128) for o in ("adamw", "apollo_mini") for lr in ("0.01", "0.003"))
    config = json.loads((spec.out / "runs/tiny-128-apollo_mini-lr0.003-s0/config.json").read_text())
    assert (config["num_training_steps"], config["scheduler"], config["seed"], config["data_seed"], config["lr"],
            config["update_proj_gap"]) == (2, "wsd", 0, 0, 0.003, 2)

    capsys.readouterr()
    assert study.run_study(spec, launch=launch) == 0  # everything finished already
    assert len(launched) == 8 and capsys.readouterr().err.count("finished already, skipped") == 8

    # one run of a stage by its index (a SLURM array task): only that run is started again
    shutil.rmtree(spec.out / "runs" / "tiny-64-adamw-lr0.003-s0")
    tune = study.plan(spec, lambda run: True)[0]["tune"]
    index = [r.name for r in tune].index("tiny-64-adamw-lr0.003-s0")
    assert study.run_study(spec, stage="tune", index=index, launch=launch) == 0
    assert len(launched) == 9 and launched[-1][launched[-1].index("--name") + 1] == "tiny-64-adamw-lr0.003-s0"
    with pytest.raises(StudyError, match="stage tune has 8 runs now, no index 8"):
        study.run_study(spec, stage="tune", index=8, launch=launch)

    # the report's best row per optimizer and budget, against the run folders read here
    report = (spec.out / "report.md").read_text()
    for tokens in (64, 128):
        section = report.split(f"## llama_tiny, {tokens} tokens")[1].split("##")[0]
        for optimizer in ("adamw", "apollo_mini"):
            finals = {}
            for lr in ("0.01", "0.003"):
                folder = spec.out / "runs" / f"tiny-{tokens}-{optimizer}-lr{lr}-s0"
                records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                finals[lr] = ([r for r in records if r.get("step") == tokens // 64 and "eval/loss" in r][0],
                              next(r["optimizer_state_bytes"] for r in records if "optimizer_state_bytes" in r))
            lr = min(finals, key=lambda k: finals[k][0]["eval/loss"])
            final, state = finals[lr]
            row = next(line for line in section.splitlines() if line.startswith(f"| {optimizer} |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1] == f"lr {float(lr):g}" and cells[2] == "1" and cells[-1] == f"tiny-{tokens}-{optimizer}-lr{lr}-s0"
            assert cells[3:6] == [f"{final['eval/loss']:.4f}", f"{final['eval/perplexity']:.2f}",
                                  f"{final['eval/bits_per_byte']:.4f}"]
            assert cells[6] == f"{state / 2**20:.2f}" and float(cells[7]) > 0
        losses = [float(line.split("|")[4]) for line in section.splitlines() if line.startswith("| a")]
        assert len(losses) == 2 and losses == sorted(losses)  # the rows are ranked by final loss
    assert "llama_tiny: AdamW has final losses at 2 budget(s) (64, 128); the fit needs 3 or more." in report
    for png in ("sensitivity.png", "curves_llama_tiny_64.png", "curves_llama_tiny_128.png"):
        with Image.open(spec.out / png) as image:
            image.verify()


# ------------------------------------------------------------------------------------ the shipped specs


def test_example_spec_plans(tmp_path, c4_dir, capsys, monkeypatch):
    text = (REPO / "scripts/studies/example.toml").read_text()
    assert 'data_dir = "../shared/data/c4"' in text
    spec_path = tmp_path / "example.toml"
    spec_path.write_text(text.replace('"../shared/data/c4"', f'"{c4_dir}"')
                         .replace('out = "runs/studies/example"', f'out = "{tmp_path / "example"}"'))
    monkeypatch.chdir(REPO)  # its model configs are relative to the repository root
    assert study.main([str(spec_path), "--print", "--rate", "20000"]) == 0
    out = capsys.readouterr().out
    # tune: (3 adamw + 3 x 2 apollo + 3 mini) x 3 budgets; seeds: 3 optimizers x 2 seeds, chosen later
    assert "# stage tune: 36 runs (0 finished)" in out
    assert "# stage seeds: 6 runs (0 finished)" in out and "6 runs chosen from stage tune" in out
    assert len([line for line in out.splitlines() if not line.startswith("#")]) == 36


def test_cpu_study_spec_covers_every_optimizer(tmp_path, c4_dir, monkeypatch):
    """scripts/studies/cpu_study.toml: every registered optimizer at >= 3 lrs on LLaMA-9M, AdamW at 3 budgets,
    the best configurations of some again at a second seed and on LLaMA-20M."""
    import apollo

    text = (REPO / "scripts/studies/cpu_study.toml").read_text()
    spec_path = tmp_path / "cpu.toml"
    spec_path.write_text(text.replace('data_dir = "runs/tokens/c4-study-t5"', f'data_dir = "{c4_dir}"')
                         .replace('out = "runs/studies/cpu_study"', f'out = "{tmp_path / "cpu"}"'))
    monkeypatch.chdir(REPO)
    spec = load_spec(spec_path)
    assert sorted(spec.optimizers) == sorted(apollo.optimizer_names())
    planned, pending = study.plan(spec, lambda run: False)
    tune = planned["tune"]
    for optimizer in apollo.optimizer_names():
        assert len({r.settings["lr"] for r in tune if r.optimizer == optimizer}) >= 3, optimizer
    assert {r.model for r in tune} == {"9m"} and len({r.tokens for r in tune}) == 1
    adamw_budgets = {r.tokens for stage in ("tune", "adamw_budgets") for r in planned[stage] if r.optimizer == "adamw"}
    assert len(adamw_budgets) == 3
    assert {"seed", "llama_20m"} <= set(pending)
    assert pending["seed"].startswith("6 runs chosen from stage tune")
    assert pending["llama_20m"].startswith("2 runs chosen from stage tune")


def test_table2_rows_spec_plans_the_papers_rows(tmp_path, c4_dir, monkeypatch):
    """scripts/studies/table2_rows.toml (issue 27's comparison): seven rows x 3 lrs on LLaMA-20M, the model-side
    rows resolved to AdamW plus their adapter flags, ReLoRA's merges in three cycles; edges extended later."""
    text = (REPO / "scripts/studies/table2_rows.toml").read_text()
    spec_path = tmp_path / "table2.toml"
    spec_path.write_text(text.replace('data_dir = "runs/tokens/c4-study-t5"', f'data_dir = "{c4_dir}"')
                         .replace('out = "runs/studies/table2_rows"', f'out = "{tmp_path / "t2"}"'))
    monkeypatch.chdir(REPO)
    planned, pending = study.plan(load_spec(spec_path), lambda run: False)
    runs = {run.name: parse_flags(run.flags) for run in planned["rows"]}
    assert len(runs) == 7 * 3 and pending["rows"].startswith("up to 2 more lrs per optimizer")
    assert pending["seed"].startswith("7 runs chosen from stage rows")  # each row's best again at seed 1
    rows = {name.split("-")[2] for name in runs}
    assert rows == {"adamw", "galore", "galore_adamw8bit", "apollo", "low_rank", "lora", "relora"}
    for name, flags in runs.items():
        row = name.split("-")[2]
        adapter = {"low_rank": "low_rank", "lora": "lora", "relora": "lora"}.get(row)
        assert flags.get("--adapter") == adapter, name
        assert flags["--optimizer"] == ("adamw" if adapter else row), name
        assert (flags.get("--relora_cycles") == "3") == (row == "relora"), name


def test_a_run_saved_before_a_flag_existed_is_the_same_configuration(tmp_path):
    """A seed-0 run whose config.json predates a TrainConfig field (no key) and a seed-1 run that saved the field
    at its default are one configuration of two seeds, not two (issue 27's study met it with --compile_optimizer)."""
    spec = load_spec(write_spec(tmp_path, optimizers="""[optimizers.adamw]
lr = [0.002]""", stages="""[[stages]]
name = "one"
budgets = [640]
[[stages]]
name = "again"
from = "one"
seeds = [1]"""))
    first, = study.plan(spec, lambda run: True)[0]["one"]
    fake_result(first, 5.0)
    config = json.loads((first.directory / "config.json").read_text())
    del config["compile_optimizer"]  # as saved before the flag existed
    (first.directory / "config.json").write_text(json.dumps(config))
    second, = study.plan(spec, lambda run: True)[0]["again"]
    fake_result(second, 5.2)
    results = study_report.load_results(spec.out / "runs")
    assert len(results) == 2 and results[0].settings == results[1].settings
    report = study_report.write_report(spec.out, memory_device="cpu").read_text()
    assert "| adamw | lr 0.002 | 2 | 5.1000 |" in report
