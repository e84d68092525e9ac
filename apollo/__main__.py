"""``python -m apollo [--model_config configs/llama_7b.json] [--dtype bfloat16] [--rank R]``: the registry as a table.

One row per registered optimizer: its name, the optimizer state it holds over the model by its spec's
``state_bytes`` formula (`apollo.registry.formula_state_bytes`: the optimizer is built on the meta device, no
step, so a 7B model costs nothing), that state as a fraction of AdamW's, and its summary. States in float32
(``state_dtype="float32"``) where the optimizer can keep them so, else in the weights' dtype, as the
training harness does.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .registry import REGISTRY, formula_state_bytes


def _meta_model(config_path: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LLaMA of `config_path` on the meta device. ValueError (one line) for a missing file, a file
    that is no JSON object, or no transformers (`import apollo` needs torch only; this table reads a LLaMA config)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise ValueError("python -m apollo builds a transformers LLaMA from --model_config: pip install transformers") from None
    try:
        with open(config_path) as handle:
            fields = json.load(handle)
    except OSError as error:
        raise ValueError(f"--model_config {config_path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--model_config {config_path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"--model_config {config_path}: not a JSON object of LlamaConfig fields")
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)


def rows(model: torch.nn.Module, rank: int | None = None) -> list[tuple[str, int | None, str]]:
    """(name, state bytes by the spec's formula or None where it cannot be built here, summary) per optimizer."""
    table = []
    for spec in REGISTRY.values():
        options = {} if spec.states_follow_weights else {"state_dtype": "float32"}
        if rank is not None and "rank" in spec.flags.values():
            options["rank"] = rank
        try:
            table.append((spec.name, formula_state_bytes(spec.name, model, **options), spec.summary))
        except ImportError:  # an optional dependency (bitsandbytes) is not installed
            table.append((spec.name, None, spec.summary))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apollo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model_config", default="configs/llama_60m.json", help="LLaMA config json")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights' dtype")
    parser.add_argument("--rank", type=int, default=None, help="rank of the low-rank optimizers (default: theirs)")
    args = parser.parse_args(argv)
    logging.getLogger("apollo").setLevel(logging.WARNING)  # the builders' routing lines
    try:
        model = _meta_model(args.model_config, getattr(torch, args.dtype))
    except ValueError as error:
        parser.error(str(error))
    table = rows(model, args.rank)
    adamw = dict((name, size) for name, size, _ in table).get("adamw")
    print(f"{args.model_config}, {args.dtype} weights: optimizer state by each spec's state_bytes formula "
          "(float32 states where the optimizer can keep them, else the weights' dtype)")
    width = max(len("optimizer"), *(len(name) for name, _, _ in table))
    print(f"{'optimizer':<{width}} {'state MB':>10} {'/ AdamW':>8}  summary")
    for name, size, summary in table:
        shown = f"{size / 2**20:10.2f}" if size is not None else f"{'n/a':>10}"
        ratio = f"{size / adamw:8.3f}" if size is not None and adamw else f"{'':>8}"
        print(f"{name:<{width}} {shown} {ratio}  {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
