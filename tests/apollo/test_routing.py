"""The one target selection (`apollo.routing`): the same forms in param_groups, apollo.hf, Fira and the
training harness, refused with one line otherwise; LLaMA, Qwen2 (tied and untied head), GPT-2."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import apollo
from apollo import hf, routing

LLAMA_ATTN = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"}
LLAMA_MLP = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")}


def _qwen2(tied):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def test_llama_forms(tiny_llama):
    model = tiny_llama()
    assert set(routing.select_targets(model)) == LLAMA_ATTN | LLAMA_MLP            # default ("attn", "mlp")
    assert set(routing.select_targets(model, ["attn"])) == LLAMA_ATTN                 # list of substrings
    assert set(routing.select_targets(model, r".*\.(q|v)_proj")) == {                # regex on whole names
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv"}
    assert set(routing.select_targets(model, "all-linear")) == LLAMA_ATTN | LLAMA_MLP  # lm_head left out
    assert set(routing.select_targets(model, ("mlp",))) == LLAMA_MLP


def test_a_string_is_a_pattern_not_its_characters(tiny_llama):
    """The bug: target_modules="attn" was iterated as 'a', 't', 't', 'n' and made every Linear (lm_head too)
    low-rank. Now a string is a whole-name regex: "attn" names no module, and the error says how to fix it."""
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"^target_modules 'attn' selects no trainable 2-D weight .* use a list "
                                         r"such as \['attn'\] for a substring"):
        apollo.param_groups(model, target_modules="attn", rank=4)
    for name in ("apollo", "fira"):
        with pytest.raises(ValueError, match="^target_modules 'attn' selects no"):
            apollo.build_optimizer(name, model, lr=1e-2, target_modules="attn")
    groups = apollo.param_groups(model, target_modules=".*attn.*", rank=4)
    low_rank = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in low_rank}
    assert names == LLAMA_ATTN


@pytest.mark.parametrize("spec, message", [
    (3, "target_modules must be 'all-linear', a regex string"),
    ([], "target_modules must be 'all-linear', a regex string"),
    (["q_proj", 3], "target_modules must be 'all-linear', a regex string"),
    ("(", "target_modules '\\(' is not a valid regular expression"),
])
def test_other_forms_are_refused_with_one_line(tiny_llama, spec, message):
    model = tiny_llama()
    for select in (routing.select_targets, hf.select_targets,
                   lambda m, s: apollo.param_groups(m, s, rank=4),
                   lambda m, s: apollo.quantize_model(m, target_modules=s, group_size=32)):
        with pytest.raises(ValueError, match=f"^{message}") as error:
            select(model, spec)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_all_linear_leaves_the_head_out_tied_or_not(tied):
    model = _qwen2(tied)
    names = set(routing.select_targets(model, "all-linear"))
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    assert names == set(routing.select_targets(model, ("attn", "mlp")))
    # the same forms in every consumer: the trainer route and the registry agree on the low-rank set
    hf_groups = hf.param_groups(model, "all-linear", rank=4)
    registry_groups = apollo.param_groups(model, "all-linear", rank=4)
    assert [id(p) for p in hf_groups[-1]["params"]] == [id(p) for p in registry_groups[1]["params"]]


def test_gpt2_conv1d_layers_are_linear():
    model = _gpt2()
    names = routing.select_targets(model, "all-linear")
    assert names == [f"transformer.h.{i}.{part}.weight" for i in range(2)
                     for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert routing.select_targets(model, ["c_attn"]) == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    # the registry's default spec ("attn", "mlp") reaches GPT-2's Conv1D too (it used to take nn.Linear only)
    optimizer = apollo.build_optimizer("apollo", model, lr=1e-2, rank=4)
    assert len(optimizer.param_groups[1]["params"]) == 8


def test_coverage_check_raises_not_asserts(tiny_llama):
    model = tiny_llama()
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match=r"^who: 1 of \d+ trainable parameters landed in no group"):
        routing.check_coverage(model, [{"params": params[:-1]}], "who")
    with pytest.raises(RuntimeError, match="^who: a parameter of shape .* landed in two groups"):
        routing.check_coverage(model, [{"params": params}, {"params": params[:1]}], "who")


def test_training_parameter_counts_use_the_same_selection(tiny_llama):
    from train.model import parameter_counts
    model = tiny_llama()
    counts = parameter_counts(model, ["mlp"])
    assert counts["low_rank"] == 2 * 3 * 64 * 160
    assert parameter_counts(model)["low_rank"] == 2 * (4 * 64 * 64 + 3 * 64 * 160)
