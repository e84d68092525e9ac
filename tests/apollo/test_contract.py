"""The contract every registered optimizer keeps, parametrised over `apollo.optimizer_names()` (torch's
`optim_db` is the model): exact resume through ``torch.load(weights_only=True)``, layer-wise equals joint,
bf16 weights with float32 states (or states that follow the weights, as the spec says) and a load that keeps
their dtype, int8 weights or the spec's refusal, a meta-device step that creates the real state, the spec's
state_bytes formula equal to that state, its default betas and eps equal to the optimizer's, torch.optim's
closure / lr-scheduler / hook / add_param_group protocol, a loss that falls, and no crippling zero-gradient step;
the memory model's step facts (torch_adamw_groups, fused_low_rank) equal to what the built optimizer runs.

A new optimizer gets these tests by being registered; its own test file holds only its math. Settings come
from its spec (`smoke_lr`, `smoke_options`: a refresh every 2 updates where the optimizer has one).
"""
import io
import json
from types import SimpleNamespace

import pytest
import torch

import apollo
from apollo.__main__ import main as apollo_main
from apollo.layerwise import LayerwiseOptimizer
from apollo.base import BaseOptimizer
from tests.conftest import TINY_LLAMA

NAMES = apollo.optimizer_names()
STEPS = 4
VOCAB = 256  # tests/conftest.TINY_LLAMA


def _spec(name):
    return apollo.get_spec(name)


def _build(name, model, **extra):
    spec = _spec(name)
    return apollo.build_optimizer(name, model, lr=spec.smoke_lr, weight_decay=0.1, **{**spec.smoke_options, **extra})


def _batch(step):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(100 + step))


def _schedule(step):  # every update its own lr, as train/loop.py sets it
    return [0.5, 1.0, 0.8, 0.6, 0.4, 0.2][step]


def _train(model, optimizer, start, stop, *, layerwise=False):
    base = None if layerwise else [group["lr"] for group in optimizer.param_groups]
    for step in range(start, stop):
        if not layerwise:
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * _schedule(step)
        model(input_ids=_batch(step), labels=_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not layerwise:
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same_weights(a, b):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def _state_tensors(optimizer):
    return [(index, key, value) for index, state in enumerate(optimizer.state.values())
            for key, value in sorted(state.items()) if isinstance(value, torch.Tensor)]


def _modes(name):
    """(weights dtype, state_dtype option): float32; bf16 weights with float32 states, or with the states the
    spec says follow the weights."""
    follows = _spec(name).states_follow_weights
    return [("float32", None), ("bfloat16", None if follows else "float32")]


RESUME_CASES = [pytest.param(name, dtype, state_dtype, id=f"{name}-{dtype}")
                for name in NAMES for dtype, state_dtype in _modes(name)]


def test_the_registry_is_not_empty():
    assert len(NAMES) >= 11 and "adamw" in NAMES


def _hidden_matrices(model):
    """The attention/MLP weights: what every low-rank and peer optimizer treats as its main case."""
    return [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]


def _distance_after_three_steps(name, tiny_llama, zero_step_first):
    model = tiny_llama(seed=0)
    optimizer = _build(name, model)  # the spec's smoke settings (the issue measured at lr 1e-2, rank 8)
    if zero_step_first:  # torchtitan's state initialisation: every gradient zero, lr 0
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    hidden = _hidden_matrices(model)
    before = [p.detach().clone() for p in hidden]
    batches = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=batches)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return torch.stack([(p.detach() - b).norm() for p, b in zip(hidden, before)]).norm().item()


def _hidden_after_three_steps(name, tiny_llama, **options):
    model = tiny_llama(seed=0)
    optimizer = _build(name, model, **options)
    _train(model, optimizer, 0, 3)
    return [p.detach().clone() for p in _hidden_matrices(model)]


@pytest.mark.parametrize("name", NAMES)
def test_the_refresh_option_sets_how_often_the_optimizer_refreshes(name, tiny_llama):
    """spec.refresh_option (what the step benchmarks set to 1 for their refresh rows): a refresh every update
    changes the weights after three updates against no refresh after the first; a spec without one takes no
    interval option the benchmarks would miss."""
    spec = _spec(name)
    if spec.refresh_option is None:
        assert not {"update_proj_gap", "precondition_frequency"} & spec.options, name
        return
    every = _hidden_after_three_steps(name, tiny_llama, **{spec.refresh_option: 1})
    never = _hidden_after_three_steps(name, tiny_llama, **{spec.refresh_option: 10**6})
    assert len(every) == len(never) > 0
    assert any(not torch.equal(a, b) for a, b in zip(every, never)), name


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_gradient_step_does_not_cripple_later_updates(name, tiny_llama):
    """Three real steps after a zero-gradient lr-0 step move the hidden matrices at least a quarter as far as
    the same three steps without it (issue 25: the limiter froze APOLLO at ~1e-11 of its normal size)."""
    with_zero = _distance_after_three_steps(name, tiny_llama, zero_step_first=True)
    without = _distance_after_three_steps(name, tiny_llama, zero_step_first=False)
    assert without > 0.1, f"{name}: the reference steps barely moved ({without})"
    assert with_zero >= 0.25 * without, f"{name}: {with_zero:.3g} after a zero step vs {without:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_the_specs_default_betas_are_what_the_optimizer_uses(name, tiny_llama):
    spec = apollo.get_spec(name)
    optimizer = apollo.build_optimizer(name, tiny_llama(), lr=1e-2)
    betas = {tuple(group["betas"]) for group in optimizer.param_groups if "betas" in group}
    assert spec.takes_betas and betas, f"{name}: no betas in its groups"
    assert spec.default_betas in betas, f"{name}: spec says {spec.default_betas}, groups use {betas}"


def _hyperparameters(optimizer):
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


@pytest.mark.parametrize("name", NAMES)
def test_the_specs_default_eps_is_what_the_optimizer_uses(name, tiny_llama):
    """Passing the spec's default_eps (what --eps's help says) builds the very optimizer no eps builds; another eps
    does not (so the comparison sees eps)."""
    spec = apollo.get_spec(name)
    assert spec.takes_eps, f"{name}: takes no eps"
    assert spec.default_eps is not None, f"spec {name!r} declares no default_eps"
    model = tiny_llama()
    plain = _hyperparameters(apollo.build_optimizer(name, model, lr=1e-2))
    assert _hyperparameters(apollo.build_optimizer(name, model, lr=1e-2, eps=spec.default_eps)) == plain, \
        f"{name}: its spec says eps {spec.default_eps}, its groups use another"
    assert _hyperparameters(apollo.build_optimizer(name, model, lr=1e-2, eps=spec.default_eps * 10)) != plain


@pytest.mark.parametrize("name", [n for n in NAMES if "weight_quant" in apollo.get_spec(n).refuses])
def test_a_refused_int8_mode_is_refused_by_the_optimizer_too(name, tiny_llama):
    model = apollo.quantize_model(tiny_llama(), group_size=32)
    with pytest.raises((ValueError, RuntimeError)):
        apollo.build_optimizer(name, model, lr=1e-2)


def test_a_registered_spec_reaches_every_derived_table(monkeypatch):
    """The harness's tables are views of the registry: a spec registered later is in all of them."""
    from train import optimizer_flags
    spec = apollo.OptimizerSpec("test_sgd", lambda model, lr, weight_decay=0.0, **o: torch.optim.SGD(model.parameters(), lr=lr),
                                frozenset({"betas", "rank"}), "SGD registered by a test", aliases=("test_sgd_alias",),
                                flags={"rank": "rank"}, default_betas=(0.5, 0.6), states_follow_weights=True,
                                refuses={"fsdp": "a test optimizer"})
    monkeypatch.setattr(apollo.registry, "REGISTRY", {**apollo.REGISTRY, "test_sgd": spec})
    monkeypatch.setattr(apollo.registry, "ALIASES", {**apollo.ALIASES, "test_sgd_alias": "test_sgd"})
    monkeypatch.setattr(apollo, "REGISTRY", apollo.registry.REGISTRY)
    assert apollo.canonical_name("test_sgd_alias") == "test_sgd"
    assert optimizer_flags.FLAG_OPTIONS["rank"]["test_sgd"] == "rank"
    assert optimizer_flags.default_betas("test_sgd") == (0.5, 0.6) and optimizer_flags.DEFAULT_BETAS["test_sgd"] == (0.5, 0.6)
    assert "test_sgd" in optimizer_flags.PARAM_DTYPE_STATES
    assert optimizer_flags.MODES["fsdp"]["test_sgd"] == "a test optimizer"
    with pytest.raises(ValueError, match=r"OptimizerSpec 'bad': unknown mode\(s\) \['fp8'\]"):
        apollo.OptimizerSpec("bad", spec.build, frozenset(), "", refuses={"fp8": "no"})
    with pytest.raises(ValueError, match=r"OptimizerSpec 'bad': flags set option\(s\) \['rank'\] it does not take"):
        apollo.OptimizerSpec("bad", spec.build, frozenset(), "", flags={"rank": "rank"})



# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name, dtype, state_dtype", RESUME_CASES)
def test_resume_through_a_weights_only_load_is_bit_identical(name, dtype, state_dtype, tiny_llama):
    """Save after 2 updates (across a refresh: smoke settings refresh every 2), load with weights_only=True into a
    model with other initial weights, 2 more updates: the weights and every state tensor equal the straight run's,
    and each state tensor keeps the dtype it was saved in (no cast to the weights' dtype)."""
    dtype = getattr(torch, dtype)
    extra = {} if state_dtype is None else {"state_dtype": state_dtype}
    straight = tiny_llama(seed=0, dtype=dtype)
    straight_optimizer = _build(name, straight, **extra)
    _train(straight, straight_optimizer, 0, STEPS)

    first = tiny_llama(seed=0, dtype=dtype)
    optimizer = _build(name, first, **extra)
    _train(first, optimizer, 0, STEPS // 2)
    saved_model, saved_optimizer = _roundtrip(first.state_dict()), _roundtrip(optimizer.state_dict())
    saved_dtypes = [(i, k, v.dtype) for i, k, v in _state_tensors(optimizer)]

    resumed = tiny_llama(seed=1, dtype=dtype)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    fresh = _build(name, resumed, **extra)
    fresh.load_state_dict(saved_optimizer)
    assert [(i, k, v.dtype) for i, k, v in _state_tensors(fresh)] == saved_dtypes
    _train(resumed, fresh, STEPS // 2, STEPS)
    _assert_same_weights(straight, resumed)
    straight_state, resumed_state = _state_tensors(straight_optimizer), _state_tensors(fresh)
    assert len(straight_state) == len(resumed_state) > 0
    for (i, key, x), (_, _, y) in zip(straight_state, resumed_state):
        assert torch.equal(x, y), (i, key)
    assert not torch.equal(straight.lm_head.weight, tiny_llama(seed=0, dtype=dtype).lm_head.weight)  # it trained


@pytest.mark.parametrize("name", NAMES)
def test_states_are_float32_for_bf16_weights_or_follow_them_as_the_spec_says(name, tiny_llama):
    model = tiny_llama(dtype=torch.bfloat16)
    follows = _spec(name).states_follow_weights
    optimizer = _build(name, model, **({} if follows else {"state_dtype": "float32"}))
    _train(model, optimizer, 0, 1)
    # a stored projection P (SVD, or store_projection) is an operand of the weights' matmuls, kept in their dtype
    floating = {value.dtype for _, key, value in _state_tensors(optimizer)
                if value.is_floating_point() and value.numel() > 1 and key != "projection"}
    if follows:  # in the weights' dtype (bitsandbytes: uint8 codes; it keeps tensors under 4096 numbers in fp32)
        dtypes = {value.dtype for _, _, value in _state_tensors(optimizer) if value.numel() > 1}
        assert dtypes & {torch.bfloat16, torch.uint8}, f"{name}: {dtypes}"
    else:
        assert floating <= {torch.float32}, f"{name}: {floating}"


# ----------------------------------------------------------------------------------------- layer-wise
@pytest.mark.parametrize("name", NAMES)
def test_layerwise_equals_joint_or_is_refused(name, tiny_llama):
    """LayerwiseOptimizer (one optimizer per parameter, stepped from gradient hooks during backward) gives the
    joint optimizer's weights to the bit, and the same state bytes; or the spec refuses the mode."""
    spec = _spec(name)
    if "layerwise" in spec.refuses:
        with pytest.raises(ValueError):
            LayerwiseOptimizer(tiny_llama(), name, lr=spec.smoke_lr, **spec.smoke_options)
        return
    joint_model, layer_model = tiny_llama(), tiny_llama()
    joint = _build(name, joint_model)
    _train(joint_model, joint, 0, 3)
    layerwise = LayerwiseOptimizer(layer_model, name, lr=spec.smoke_lr, weight_decay=0.1, lr_lambda=_schedule,
                                   **spec.smoke_options)
    _train(layer_model, layerwise, 0, 3, layerwise=True)
    _assert_same_weights(joint_model, layer_model)
    assert apollo.optimizer_state_bytes(layerwise) == apollo.optimizer_state_bytes(joint)


@pytest.mark.parametrize("name", NAMES)
def test_step_options_are_options_its_constructor_takes(name, tiny_llama):
    """LayerwiseOptimizer rebuilds each layer's optimizer from the joint one's groups and `step_options()`:
    the class must take them back and report the same ones."""
    optimizer = _build(name, tiny_llama())
    if not isinstance(optimizer, BaseOptimizer):
        return  # torch's classes keep every option in their groups
    groups = [dict(group) for group in optimizer.param_groups]
    rebuilt = type(optimizer)(groups, **optimizer.step_options())
    assert rebuilt.step_options() == optimizer.step_options()


# ------------------------------------------------------------------------------------------ int8 weights
@pytest.mark.parametrize("name", NAMES)
def test_int8_weights_train_or_are_refused_in_one_line(name, tiny_llama):
    spec = _spec(name)
    model = apollo.quantize_model(tiny_llama(), group_size=32)
    if "weight_quant" in spec.refuses:
        with pytest.raises(ValueError) as error:
            _build(name, model)
        assert "\n" not in str(error.value) and "int8" in str(error.value)
        return
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    assert codes
    optimizer = _build(name, model)
    _train(model, optimizer, 0, 2)
    changed = [n for n, b in model.named_buffers() if n in codes and not torch.equal(b, codes[n])]
    assert changed, f"{name}: no int8 weight changed"


# -------------------------------------------------------------------------------------- meta device
@pytest.mark.parametrize("name", NAMES)
def test_a_meta_device_step_creates_the_real_state(name, tiny_llama):
    """train.memory counts state from one step on the meta device: it must equal a real step's, tensor by tensor."""
    real, meta = tiny_llama(), tiny_llama(device="meta")
    real_optimizer, meta_optimizer = _build(name, real), _build(name, meta)
    _train(real, real_optimizer, 0, 1)
    for param in meta.parameters():
        param.grad = torch.empty_like(param)
    meta_optimizer.step()
    assert apollo.optimizer_state_bytes(meta_optimizer) == apollo.optimizer_state_bytes(real_optimizer) > 0
    assert [(i, k, v.shape, v.dtype) for i, k, v in _state_tensors(meta_optimizer)] == \
           [(i, k, v.shape, v.dtype) for i, k, v in _state_tensors(real_optimizer)]


@pytest.mark.parametrize("name, dtype, state_dtype", RESUME_CASES)
def test_state_bytes_after_a_step_equal_the_specs_formula(name, dtype, state_dtype, tiny_llama):
    """apollo.optimizer_state_bytes after one meta-device step (as train.memory counts) = the sum of the spec's
    state_bytes(param, group), for float32 weights and bf16 weights with the spec's state dtype."""
    spec = _spec(name)
    assert spec.state_bytes is not None, f"spec {name!r} declares no state_bytes"
    model = tiny_llama(dtype=getattr(torch, dtype), device="meta")
    optimizer = _build(name, model, **({"state_dtype": state_dtype} if state_dtype else {}))
    for param in model.parameters():
        param.grad = torch.empty_like(param)
    optimizer.step()
    formula = {id(p): spec.state_bytes(p, group) for group in optimizer.param_groups for p in group["params"]}
    held = {id(p): apollo.optimizer_state_bytes(SimpleNamespace(state={p: optimizer.state.get(p, {})}))
            for p in model.parameters()}
    wrong = [(n, held[id(p)], formula[id(p)]) for n, p in model.named_parameters() if held[id(p)] != formula[id(p)]]
    assert not wrong, f"{name}: (parameter, held, formula) {wrong[:3]}"
    assert apollo.optimizer_state_bytes(optimizer) == sum(formula.values()) > 0


def test_python_m_apollo_lists_every_optimizers_formula_state(tmp_path, capsys, tiny_llama):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_LLAMA))
    assert apollo_main(["--model_config", str(tmp_path / "tiny.json")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == list(NAMES)
    adamw = sum(4 + 2 * 4 * p.numel() for p in tiny_llama().parameters())  # float32 step + two float32 moments
    assert rows["adamw"][1:3] == [f"{adamw / 2**20:.2f}", "1.000"]


def test_a_spec_without_a_state_formula_is_named(monkeypatch, tiny_llama):
    spec = apollo.OptimizerSpec("no_formula", apollo.get_spec("adamw").build, frozenset(), "no state_bytes")
    monkeypatch.setitem(apollo.REGISTRY, "no_formula", spec)
    with pytest.raises(ValueError, match="^spec 'no_formula' declares no state_bytes$"):
        apollo.registry.formula_state_bytes("no_formula", tiny_llama(device="meta"))


# ---------------------------------------------------------------------------- torch.optim's protocol
@pytest.mark.parametrize("name", NAMES)
def test_closure_scheduler_hooks_and_add_param_group(name, tiny_llama):
    model = tiny_llama()
    optimizer = _build(name, model)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=_batch(0), labels=_batch(0)).loss
        loss.backward()
        return loss
    calls = []
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    before = model.lm_head.weight.detach().clone()
    losses = [optimizer.step(closure) for _ in range(2)]  # two: SOAP's first step only initialises
    assert all(isinstance(loss, torch.Tensor) and torch.isfinite(loss) for loss in losses) and calls == ["post"] * 2
    assert not torch.equal(model.lm_head.weight, before)
    handle.remove()

    base = [group["lr"] for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    closure()
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([lr * 0.5 for lr in base])
    for group, lr in zip(optimizer.param_groups, base):
        group["lr"] = lr

    extra = torch.nn.Parameter(torch.randn(8))  # a new 1-D parameter: every optimizer's plain-Adam kind of tensor
    try:
        optimizer.add_param_group({"params": [extra]})
    except ValueError as error:  # refused: one line saying why
        assert "\n" not in str(error)
        return
    start = extra.detach().clone()
    for _ in range(2):
        closure()
        extra.grad = torch.ones(8)
        optimizer.step()
    assert not torch.equal(extra.detach(), start), f"{name}: the added group was not updated"


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_repeated_batch(name, tiny_llama):
    model = tiny_llama()
    optimizer = _build(name, model, **({"update_proj_gap": 200} if "update_proj_gap" in _spec(name).smoke_options else {}))
    batch = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(5.55, abs=0.1)  # ln(256)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_from_groups_rebuilds_the_optimizer_the_builder_made(name, tiny_llama):
    """spec.from_groups (how integrations such as torchtitan construct it over their own groups) over the builder's
    groups gives the same class and, over two steps, the same weights to the bit."""
    spec = _spec(name)
    assert spec.from_groups is not None, f"{name}: its spec has no from_groups"
    built_model, rebuilt_model = tiny_llama(), tiny_llama()
    built = _build(name, built_model)
    by_id = {id(p): q for p, q in zip(built_model.parameters(), rebuilt_model.parameters())}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [by_id[id(p)] for p in group["params"]]}
              for group in built.param_groups]
    rebuilt = spec.from_groups(groups, lr=spec.smoke_lr)
    assert type(rebuilt) is type(built)
    _train(built_model, built, 0, 2)
    _train(rebuilt_model, rebuilt, 0, 2)
    _assert_same_weights(built_model, rebuilt_model)


def _optimizers_inside(optimizer):
    """The optimizer and the torch optimizers it holds as attributes or in a dict attribute (Muon's inner ones)."""
    inside = [optimizer]
    for value in vars(optimizer).values():
        values = value.values() if isinstance(value, dict) else [value]
        inside += [v for v in values if isinstance(v, torch.optim.Optimizer) and v is not optimizer]
    return inside


@pytest.mark.parametrize("name", NAMES)
def test_torch_adamw_groups_are_the_groups_torch_adamw_steps(name, tiny_llama):
    """spec.torch_adamw_groups (train.memory's CUDA foreach term) names exactly the parameters that a
    torch.optim.AdamW of the built optimizer holds: the optimizer itself or one it steps inside."""
    spec = _spec(name)
    if not spec.available:
        pytest.skip(f"{name} needs {', '.join(spec.requires)}")
    optimizer = _build(name, tiny_llama())
    held = {id(p) for inner in _optimizers_inside(optimizer) if type(inner) is torch.optim.AdamW
            for group in inner.param_groups for p in group["params"]}
    declared = {id(p) for group in optimizer.param_groups for p in group["params"]
                if spec.torch_adamw_groups is not None and spec.torch_adamw_groups(group)}
    assert held == declared, f"{name}: torch AdamW holds {len(held)} parameters, its spec declares {len(declared)}"


@pytest.mark.parametrize("name", NAMES)
def test_fused_low_rank_is_whether_a_step_updates_whole_chunks_at_once(name, tiny_llama, monkeypatch):
    """spec.fused_low_rank (train.memory counts the largest chunk's P, R and direction, scratch.fused_step) is
    whether a step of the built optimizer runs apollo/fused.py's chunk-wide low-rank updates (`apollo_updates`,
    `galore_updates`); Fira also walks `fused.step_chunks` but updates one matrix at a time (its own model)."""
    spec = _spec(name)
    if not spec.available:
        pytest.skip(f"{name} needs {', '.join(spec.requires)}")
    import apollo.fused

    calls = []
    for function in ("apollo_updates", "galore_updates"):
        original = getattr(apollo.fused, function)
        monkeypatch.setattr(apollo.fused, function,
                            lambda *args, _f=original, **kwargs: calls.append(args) or _f(*args, **kwargs))
    model = tiny_llama()
    _train(model, _build(name, model), 0, 1)
    assert bool(calls) == spec.fused_low_rank, f"{name}: {len(calls)} chunk-wide updates, spec says {spec.fused_low_rank}"


@pytest.mark.parametrize("text, line", [
    (None, "--model_config {path}: No such file or directory"),
    ("[1, 2]", "--model_config {path}: not a JSON object of LlamaConfig fields"),
    ("{bad", "--model_config {path}: not JSON (Expecting property name enclosed in double quotes, line 1)"),
])
def test_python_m_apollo_refuses_a_bad_model_config_in_one_line(tmp_path, capsys, text, line):
    path = tmp_path / "config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        apollo_main(["--model_config", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "python -m apollo: error: " + line.format(path=path)
