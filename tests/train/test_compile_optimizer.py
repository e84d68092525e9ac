"""--compile_optimizer: the fused APOLLO step's low-rank moments and channel norms in one compiled kernel per weight
(the optimizer built with elementwise="compiled"): the losses equal the foreach step's within float round-off, the
compiled path is the one taken, a compiled run resumes bit-identically and leaves the process's default mode
alone, and what it cannot serve is refused in one line.
"""
import pytest
import torch

import apollo
from apollo import fused
from tests.train.test_cli import read_metrics, tiny_args, weights
from tests.train.test_compile import inductor_cache  # noqa: F401  (a persistent compile cache for this module)
from train import __main__ as cli

APOLLO = {"optimizer": "apollo", "rank": 4, "update_proj_gap": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, c4_dir, tokenizer_dir):
    """A foreach and a compiled 6-update APOLLO run of the same config (checkpoints at 3 and 6), and how many
    weights the compiled one sent through the compiled moments-and-factor kernel."""
    folder = tmp_path_factory.mktemp("compile_optimizer")
    original = fused._compiled_adam_channel_factor
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    fused._compiled_adam_channel_factor = counted
    try:
        result = {}
        for name, flags in (("foreach", {}), ("compiled", {"compile_optimizer": True})):
            argv = tiny_args(folder, c4_dir, tokenizer_dir, folder / name, **APOLLO, **flags)
            assert cli.main(argv) == 0
            result[name] = {"run": folder / name, "argv": argv, "calls": len(calls)}
        resumed = folder / "compiled_resumed"
        argv = result["compiled"]["argv"] + ["--continue_from", str(folder / "compiled" / "step_0000003"),
                                             "--save_dir", str(resumed)]
        assert cli.main(argv) == 0
        result["resumed"] = {"run": resumed}
    finally:
        fused._compiled_adam_channel_factor = original
    result["default_after"] = dict(fused.ELEMENTWISE)
    return result


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def test_compiled_moments_give_the_foreach_losses_within_round_off(runs):
    foreach, compiled = losses(runs["foreach"]["run"]), losses(runs["compiled"]["run"])
    assert [step for step, _ in compiled] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in foreach], rel=1e-5, abs=0)
    assert runs["foreach"]["calls"] == 0  # the default path never reaches the compiled kernel
    # 6 updates x the tiny model's 14 attention/MLP matrices (2 layers x 7), every one through the kernel
    assert runs["compiled"]["calls"] == 6 * 14
    # the choice is the run's optimizer's, not the process's: the default mode is untouched
    assert runs["default_after"] == {"cpu": "foreach"}


def test_a_compiled_optimizer_run_resumes_bit_identically(runs):
    expected = weights(runs["compiled"]["run"] / "step_0000006")
    got = weights(runs["resumed"]["run"] / "step_0000006")
    assert len(expected) > 0 and expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [x for x in losses(runs["resumed"]["run"]) if x[0] > 3] == [x for x in losses(runs["compiled"]["run"]) if x[0] > 3]


FUSED = ", ".join(name for name in apollo.optimizer_names() if apollo.get_spec(name).fused_low_rank)


@pytest.mark.parametrize("flags,line", [
    ({"optimizer": apollo.BASELINE},
     f"--compile_optimizer compiles the fused low-rank step of {FUSED}; --optimizer {apollo.BASELINE} has none"),
    ({**APOLLO, "weight_quant": True, "weight_group_size": 32},
     "--compile_optimizer does not combine with --weight_quant: int8 weights take the plain step"),
])
def test_what_it_cannot_compile_is_refused_in_one_line(tmp_path, c4_dir, tokenizer_dir, capsys, flags, line):
    argv = tiny_args(tmp_path, c4_dir, tokenizer_dir, tmp_path / "run", compile_optimizer=True, **flags)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {line}"
    assert not (tmp_path / "run").exists()


def test_an_unknown_elementwise_mode_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"elementwise must be one of \('foreach', 'compiled'\) or None"):
        apollo.build_optimizer("apollo", model, lr=1e-3, rank=2, target_modules=["0"], elementwise="inductor")


def test_fira_which_has_no_compiled_update_refuses_the_option():
    from apollo.fira import Fira

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="Fira: its step has no compiled moment update; elementwise must be None"):
        Fira([{"params": list(model.parameters())[:1], "rank": 2}], elementwise="compiled")
