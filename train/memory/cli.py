"""Memory of one LLaMA pretraining step: estimated without allocating anything, or measured on the CPU.

The command line of `python -m train.memory` (train/memory/__main__.py runs `main`): bad flags exit 2
with one line on stderr before anything is built.
"""
from __future__ import annotations

import argparse
import ast
import sys

import apollo
from train.adapters import ADAPTERS, AdapterChoice
from train.memory.estimator import Estimate, estimate
from train.memory.measurement import measure, measure_distributed
from train.memory.meta import DTYPE_BYTES, GB
from train.memory.planner import format_plan, parse_bytes, plan


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a string (e.g. adjust_lr_fn=match_rms_adamw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_config", required=True, help="LLaMA config json, e.g. configs/llama_7b.json")
    parser.add_argument("--optimizer", default=apollo.BASELINE, help=" | ".join(apollo.optimizer_names()))
    parser.add_argument("--rank", type=int, default=None,
                        help="projection rank (default: the preset's, hidden/4; with --max_batch: every low-rank "
                             "optimizer but APOLLO-Mini, which keeps rank 1)")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a further apollo.build_optimizer option, e.g. precondition_frequency=1 (repeatable)")
    parser.add_argument("--adapter", default="none", choices=("none", *ADAPTERS),
                        help="model-side row (train/adapters.py): LoRA (frozen W0 + factors) or Low-Rank (factors only), "
                             "trained with --optimizer; with --max_batch: extra adamw+ADAPTER rows")
    parser.add_argument("--lora_rank", type=int, default=None, help="rank r of the adapters (required with --adapter)")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="adapter dropout (its masks are activations)")
    parser.add_argument("--batch_size", type=int, default=1, help="micro-batch, in sequences")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--gradient_accumulation", type=int, default=1, help="micro-batches per update")
    parser.add_argument("--weight_quant", action="store_true", help="int8 attention/MLP weights")
    parser.add_argument("--weight_bits", type=int, default=8, help="bits per quantised weight (8 only)")
    parser.add_argument("--weight_group_size", type=int, default=128, help="elements per quantisation group")
    parser.add_argument("--stochastic_round", action="store_true", help="stochastic re-quantisation (scratch only)")
    parser.add_argument("--layerwise", action="store_true", help="per-parameter updates during backward")
    parser.add_argument("--activation_checkpointing", action="store_true", help="recompute layers in backward")
    parser.add_argument("--packing", action="store_true", help="packed sequences: no padding mask")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="model dtype")
    parser.add_argument("--state_dtype", default=None, choices=("float32", "param"),
                        help="optimizer-state dtype (default: float32; torch AdamW, Muon, 8-bit AdamW follow the weights)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the step would run")
    parser.add_argument("--world_size", type=int, default=1,
                        help="data-parallel processes (> 1: DDP's buckets, or FSDP2's shards with --fsdp)")
    parser.add_argument("--ddp_copy", action="store_true",
                        help="model torch's plain DDP (a second copy of every gradient) instead of the harness's")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2: per-rank shards of weights, gradients, states")
    parser.add_argument("--fsdp_mixed_precision", action="store_true", help="with --fsdp: bf16 compute, fp32 reduction")
    parser.add_argument("--measure", action="store_true",
                        help="also run the step on this CPU (with --world_size N: N gloo processes) and print its peak")
    parser.add_argument("--measure_steps", type=int, default=2, help="steps --measure runs (the largest peak counts)")
    parser.add_argument("--max_batch", action="store_true",
                        help="the planner: largest micro-batch per optimizer and memory mode that fits --gpu_memory")
    parser.add_argument("--gpu_memory", default=None, help="the card's memory for --max_batch, e.g. 80GiB or 80GB")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated optimizers for --max_batch (default: every registered one)")
    return parser


def _print_estimate(args, result: Estimate, measured: int | None) -> None:
    mode = [args.optimizer + (f" rank {args.rank}" if args.rank else ""),
            *([f"{args.adapter} r {args.lora_rank}, dropout {args.lora_dropout:g}"] if args.adapter != "none" else []),
            *([f"int8 weights g{args.weight_group_size}"] if args.weight_quant else []),
            *(["layer-wise"] if args.layerwise else []),
            *(["activation checkpointing"] if args.activation_checkpointing else []),
            *([f"accumulation {args.gradient_accumulation}"] if args.gradient_accumulation > 1 else []),
            *([f"FSDP2 x {args.world_size}"] if args.fsdp else
              [f"{'plain ' if args.ddp_copy else ''}DDP x {args.world_size}"] if args.world_size > 1 else [])]
    print(f"{args.model_config}: {result.parameters / 1e6:.1f}M parameters | {', '.join(mode)} | batch {args.batch_size} x "
          f"{args.max_length} tokens | {args.dtype} weights, {result.notes['state dtype']} states")
    print("  largest in the step:")
    for term, value in result.terms().items():
        if term in ("gradients", "activations", "update scratch"):
            print(f"  {term:<17}{value / GB:8.3f} GB  {result.notes.get(term, '')}".rstrip())
    print(f"  at the peak ({result.peak_phase}), the terms of the total:")
    for term, value in result.breakdown.items():
        note = result.notes.get(term, "") if term in ("weights", "optimizer states") else ""
        print(f"    {term:<21}{value / GB:8.3f} GB  {note}".rstrip())
    print(f"  {'total (peak)':<17}{result.total / GB:8.3f} GB  = the sum of the terms above")
    others = ", ".join(f"{phase} {value / GB:.3f}" for phase, value in result.phases.items() if phase != result.peak_phase)
    print(f"  other phases: {others} GB")
    if measured is not None:
        print(f"  {'measured (CPU)':<17}{measured / GB:8.3f} GB  ({(measured - result.total) / 1e6:+.2f} MB, "
              f"{measured / result.total - 1:+.2%} vs the estimate)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from train.model import load_llama_config

        for flag in ("batch_size", "max_length", "weight_group_size", "world_size", "gradient_accumulation",
                     "measure_steps"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
        config = load_llama_config(args.model_config)
        options = dict(args.option)
        adapter = None
        if args.adapter != "none":
            if args.lora_rank is None or args.lora_rank < 1:
                raise ValueError(f"--adapter {args.adapter} needs --lora_rank, a positive integer")
            if not 0 <= args.lora_dropout < 1:
                raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
            adapter = AdapterChoice(args.adapter, args.lora_rank, lora_dropout=args.lora_dropout)
        elif args.lora_rank is not None:
            raise ValueError("--lora_rank needs --adapter lora or low_rank")
        if args.max_batch:
            if args.gpu_memory is None:
                raise ValueError("--max_batch needs --gpu_memory, e.g. --gpu_memory 80GiB")
            gpu = parse_bytes(args.gpu_memory)
            optimizers = args.optimizers.split(",") if args.optimizers else None
            rows = plan(config, gpu, max_length=args.max_length, optimizers=optimizers, world_size=args.world_size,
                        fsdp=args.fsdp, fsdp_mixed_precision=args.fsdp_mixed_precision, dtype=args.dtype,
                        state_dtype=args.state_dtype, rank=args.rank, packing=args.packing, device=args.device,
                        weight_group_size=args.weight_group_size, gradient_accumulation=args.gradient_accumulation,
                        adapters=[adapter] if adapter else None)
            where = (f"FSDP2 over {args.world_size} processes" if args.fsdp else
                     f"DDP over {args.world_size} processes" if args.world_size > 1 else "one process")
            print(f"{args.model_config}: largest micro-batch x {args.max_length} tokens whose estimated peak fits "
                  f"{gpu / GB:.1f} GB ({args.gpu_memory}), {where}, {args.dtype} weights; each optimizer's defaults")
            print("\n".join(format_plan(rows, gpu)))
            return 0
        settings = dict(optimizer=args.optimizer, batch_size=args.batch_size, max_length=args.max_length,
                        rank=args.rank, activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
                        state_dtype=args.state_dtype, packing=args.packing,
                        gradient_accumulation=args.gradient_accumulation, options=options, adapter=adapter)
        single = dict(weight_quant=args.weight_quant, weight_group_size=args.weight_group_size,
                      stochastic_round=args.stochastic_round, layerwise=args.layerwise)
        result = estimate(config, weight_bits=args.weight_bits, device="cpu" if args.measure else args.device,
                          world_size=args.world_size, ddp_bucket_view=not args.ddp_copy, fsdp=args.fsdp,
                          fsdp_mixed_precision=args.fsdp_mixed_precision, **settings, **single)
        measured, ranks = None, None
        if args.measure and args.world_size > 1:
            if args.weight_quant or args.layerwise or args.fsdp_mixed_precision:
                raise ValueError("--measure with --world_size runs float weights, no --layerwise/--fsdp_mixed_precision")
            if adapter is not None:
                raise ValueError("--measure with --world_size builds no adapters: measure --adapter on one process")
            mode = "fsdp" if args.fsdp else "ddp_copy" if args.ddp_copy else "ddp"
            ranks = measure_distributed(config, mode=mode, world_size=args.world_size, steps=args.measure_steps,
                                        **settings)
            measured = max(peak for peak, _ in ranks)
        elif args.measure:
            measured = measure(config, steps=args.measure_steps, **settings, **single)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_estimate(args, result, measured)
    if ranks:
        print("  per rank, measured: " + "; ".join(f"peak {peak / GB:.4f} GB, optimizer states {states} bytes"
                                                  for peak, states in ranks)
              + f" (estimated states {result.optimizer_states} bytes)")
    return 0

