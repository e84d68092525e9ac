"""The optimizer-step benchmarks run and time what they say (benchmarks/optimizer_step*.py)."""
import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import cpu_streams  # noqa: E402
import optimizer_step  # noqa: E402
import optimizer_step_phases  # noqa: E402

import apollo  # noqa: E402


def test_rows_bring_their_baselines_and_published_counterparts():
    rows = ["apollo_mini (plain path)"]
    chosen = [name for name in ["torch adamw foreach", "torch adamw fused", "apollo", "apollo_mini (plain path)",
                                "apollo-torch apollo", "apollo-torch apollo_mini", "galore-torch galore"]
              if optimizer_step.selected(name, rows)]
    assert chosen == ["torch adamw foreach", "torch adamw fused", "apollo_mini (plain path)", "apollo-torch apollo_mini"]


def test_benchmark_table_for_one_row():
    table = optimizer_step.benchmark("60m", torch.float32, steps=1, refresh_steps=1, rows=["apollo_mini"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert {"torch adamw foreach", "torch adamw fused", "apollo_mini"} <= set(rows)
    assert "apollo" not in rows and "galore" not in rows
    # state MB: Mini keeps 2 moments of 1 x max(m, n) per matrix, AdamW two full-size ones
    assert float(rows["apollo_mini"][3]) < 0.6 * float(rows["torch adamw fused"][3])
    assert rows["torch adamw fused"][4] == "1.00"


def test_phases_time_the_functions_of_the_fused_step():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 32), torch.nn.LayerNorm(32))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    regular = [p for p in model.parameters() if p.ndim == 1]
    matrices = [p for p in model.parameters() if p.ndim == 2]
    optimizer = apollo.APOLLO([{"params": regular}, {"params": matrices, "rank": 4, "update_proj_gap": 10**9}], lr=1e-3)
    unwrapped_project = apollo.fused._project
    phases = optimizer_step_phases.phase_ms(optimizer, steps=2)
    # every wrapped function was reached (a renamed one would read 0)
    for phase in ("draw P", "projection matmuls", "G's norms", "moments and direction", "scaling factors",
                  "limiter, weight update, decay", "fused AdamW (regular)"):
        assert phases[phase] > 0, phase
    assert phases["step"] == pytest.approx(sum(v for k, v in phases.items() if k != "step"))
    # the wrappers are removed afterwards
    assert apollo.fused._project is unwrapped_project


def test_a_chunk_size_below_one_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["optimizer_step.py", "--models", "60m", "--cpu_chunk_elements", "0"])
    with pytest.raises(SystemExit) as exit_info:
        optimizer_step.main()
    assert exit_info.value.code == 2
    assert "--cpu_chunk_elements must be >= 1" in capsys.readouterr().err
    assert apollo.fused.CPU_CHUNK_GRAD_ELEMENTS == 2**22  # untouched


def test_muon_step_times_each_shape_that_muon_updates_once():
    """benchmarks/muon_step.py: the shapes and counts of the decoder matrices (LLaMA: q/k/v/o square,
    gate/up intermediate x hidden, down hidden x intermediate; never the embedding or head), one time each."""
    import muon_step
    from transformers import LlamaConfig, LlamaForCausalLM

    # its own sizes: the shape counts asserted below are of this model
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert muon_step.shape_counts(model) == {(16, 16): 8, (40, 16): 4, (16, 40): 2}
    times = muon_step.time_shapes(model, repeats=1)
    assert list(times) == [(16, 16), (16, 40), (40, 16)] and all(t > 0 for t in times.values())


@pytest.mark.parametrize("script,argv,message", [
    ("optimizer_step", ["--models", "60m", "--warmup", "0"], "--warmup, --steps and --refresh_steps must be >= 1"),
    ("muon_step", ["--model", "60m", "--repeats", "0"], "--threads and --repeats must be >= 1"),
])
def test_step_counts_below_one_are_refused_before_any_work(script, argv, message, monkeypatch, capsys):
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    monkeypatch.setattr(module, "build_parameters", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_anchor_that_cannot_run_says_why_and_one_that_runs_steps(monkeypatch):
    """A missing library is a one-line reason in its row; an installed one takes its first step (weights restored)."""
    import anchors

    generator = torch.Generator().manual_seed(0)
    # named as apollo.param_groups' default targets choose them ("attn", "mlp")
    model = torch.nn.Sequential(collections.OrderedDict(
        attn=torch.nn.Linear(32, 48), mlp=torch.nn.Linear(48, 32), norm=torch.nn.LayerNorm(32)))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setitem(sys.modules, "heavyball", None)  # import heavyball -> ModuleNotFoundError
    built, failed = anchors.build_anchors(model, ["heavyball adamw (compiled)"], rank=4, gap=10)
    assert built == {}
    assert failed == {"heavyball adamw (compiled)": "heavyball is not installed (pip install --no-deps --target "
                                                    "benchmarks/.anchors ...; see benchmarks/anchors.py)"}
    pytest.importorskip("pytorch_optimizer")
    built, failed = anchors.build_anchors(model, ["pytorch-optimizer apollo_mini"], rank=4, gap=10)
    assert failed == {} and list(built) == ["pytorch-optimizer apollo_mini"]
    assert len(built["pytorch-optimizer apollo_mini"].state) == 6  # every parameter took a step
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_compile_throughput_refuses_an_unknown_model_before_building_anything(capsys):
    import compile_throughput

    with pytest.raises(SystemExit) as exit_info:
        compile_throughput.main(["--models", "5m"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: no configs/llama_5m.json")


def test_every_registered_optimizer_is_a_row_built_with_its_refresh_interval(tiny_llama):
    """The step benchmark's rows come from the registry: every registered optimizer with its packages (torch's
    AdamW as the baselines), built by its factory; a refresh option set to the benchmark's gap in its groups."""
    expected = {n for n in apollo.optimizer_names() if n != apollo.BASELINE and apollo.get_spec(n).available}
    assert len(expected) >= 12 and set(optimizer_step.FUSED_ROWS + optimizer_step.PEER_ROWS) == expected
    factories = optimizer_step.optimizers(tiny_llama(), rank=4, gap=7)
    assert set(optimizer_step.ROWS) <= set(factories)
    for name in sorted(expected):
        optimizer = factories[name]()
        assert type(optimizer) is type(apollo.build_optimizer(name, tiny_llama(), lr=1e-3, **(
            {"rank": 4} if "rank" in apollo.get_spec(name).smoke_options else {}))), name
        option = apollo.get_spec(name).refresh_option
        if option is not None:
            values = {group[option] for group in optimizer.param_groups if option in group}
            assert values == {7}, (name, values)


def test_cpu_streams_counts_the_bytes_each_operation_must_move(capsys):
    """Each row's MB is its passes x the matrices' float32 bytes: 1 for a read-only reduction or a projection,
    2 for W *= 1, 3 for W += a G, 7 for AdamW (G, W, M, V read; W, M, V written)."""
    results = cpu_streams.rows((256, 384), count=2, rounds=1)
    one_pass = 2 * 256 * 384 * 4 / 1e6
    passes = {name: mb / one_pass for name, _, mb in results}
    assert passes == pytest.approx({
        "read: sum(G)": 1, "read: dot(G, G) (BLAS)": 1, "read + write: W *= 1": 2, "read + write: W += a G": 3,
        "read + write: torch fused AdamW": 7, "rank-1 right, torch (G p)": 1, "rank-1 right, split (fused._project)": 1,
        "rank-1 left, torch (p^T G)": 1, "rank-1 left, split (fused._project)": 1})
    assert all(ms > 0 for _, ms, _ in results)
    with pytest.raises(SystemExit):
        cpu_streams.main(["--count", "0"])
    assert "--shape, --count and --rounds must be >= 1" in capsys.readouterr().err
