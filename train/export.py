"""Export a checkpoint as a Hugging Face model folder: take a model trained here to other tools.

    python -m train.export runs/llama_60m_apollo --out exported/llama_60m [--dtype bfloat16] [--push_to_hub user/name]
    lm_eval --model hf --model_args pretrained=exported/llama_60m --tasks hellaswag

RUN_DIR_OR_STEP is a run folder (its latest complete step_* is exported) or one step_* folder. --out
(absent or empty) receives config.json (the run's LlamaConfig, with use_cache on for inference),
generation_config.json, model.safetensors and the tokenizer the run trained with, so that
``AutoModelForCausalLM.from_pretrained(out)`` gives the run's logits. Where the weights come from:

- a plain checkpoint: its model.safetensors;
- int8 weights (--weight_quant, Q-APOLLO): each uint8 weight de-quantised, ŵ = (q - z) s in float32
  (`apollo.quant.dequantize`, what the run's forward computed), its scale/zero/rounding buffers dropped;
- adapters (--adapter, train/adapters.py): LoRA merged into plain weights W = W0 + s B A, Low-Rank written as
  W = s B A (each summed in float64, rounded once to the stored dtype); the exported folder needs no peft;
- a sharded checkpoint (--fsdp): the "model" entries of its torch.distributed.checkpoint folder, read as
  whole tensors in this one process (no process group; the optimizer state is not read).

--dtype: float32 or bfloat16 (default: the run's --dtype). The files are written under a temporary name
beside --out and renamed when complete. --push_to_hub REPO uploads the folder (only when given).
Exit status 0, 2 with one line for a bad input (no checkpoint, --out not empty, a model config that
does not match the weights, a tokenizer that cannot be loaded), 1 when the upload fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

from train.adapters import merge_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANT_BUFFERS = ("weight_scales", "weight_zeros", "rounding_state")  # apollo.quant.QuantLinear's buffers


class ExportError(ValueError):
    """A bad input; the message is one line."""


# ------------------------------------------------------------------------------------ the weights


def dequantize_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 (QuantLinear) entries -> float32 weights ŵ = (q - z) s; everything else unchanged."""
    from apollo.quant import dequantize

    result = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in QUANT_BUFFERS and f"{prefix}.weight_scales" in state:
            continue
        if leaf == "weight" and f"{prefix}.weight_scales" in state:
            value = dequantize(value, state[f"{prefix}.weight_scales"], state[f"{prefix}.weight_zeros"], torch.float32)
        result[key] = value
    return result


def sharded_model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The "model" entries of a torch.distributed.checkpoint folder, as whole tensors (this process only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    targets = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    if not targets:
        raise ExportError(f"{folder} holds no model tensors")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": targets}, checkpoint_id=str(folder), no_dist=True)
    return targets


def checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float weights of a checkpoint folder (plain, int8 or sharded), keyed like the model's state dict."""
    from safetensors.torch import load_file

    from train.checkpoint import is_sharded

    if is_sharded(checkpoint):
        return sharded_model_state(checkpoint / "sharded")
    return dequantize_state_dict(load_file(checkpoint / "model.safetensors"))


# ---------------------------------------------------------------------------------- the export


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} is not an empty folder: choose a new one")


def _load_run(path: Path, model_config: str | None) -> tuple[Path, dict, object]:
    """(checkpoint folder, its run config, its LlamaConfig)."""
    from train.checkpoint import find_checkpoint
    from train.model import load_llama_config

    if not path.exists():
        raise ExportError(f"{path} does not exist: give a run folder or one of its step_* checkpoints")
    try:
        checkpoint = find_checkpoint(path)
    except ValueError as error:
        raise ExportError(str(error)) from None
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{checkpoint / 'config.json'}: cannot read the run config ({error})") from None
    source = model_config or config.get("model_config")
    if not source or not Path(source).is_file():
        raise ExportError(f"model config {source!r} of {checkpoint} not found: pass --model_config PATH")
    try:
        return checkpoint, config, load_llama_config(source)
    except ValueError as error:
        raise ExportError(str(error)) from None


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"cannot load the tokenizer {name!r} ({message}): pass --tokenizer FOLDER") from None


def export(path: str | Path, out: str | Path, *, dtype: str | None = None, model_config: str | None = None,
           tokenizer: str | None = None) -> Path:
    """Write the Hugging Face folder of the checkpoint at `path` into `out`; returns `out`. Raises ExportError."""
    from transformers import AutoModelForCausalLM

    path, out = Path(path), Path(out)
    _check_out(out)
    checkpoint, config, llama_config = _load_run(path, model_config)
    dtype = dtype or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    loaded_tokenizer = _load_tokenizer(tokenizer or config.get("tokenizer") or "t5-base")  # before writing anything
    try:  # --adapter: LoRA merged (W0 + s B A), Low-Rank as s B A, so from_pretrained needs no peft
        merged = merge_state_dict(checkpoint_state(checkpoint), config)
    except (KeyError, ValueError) as error:
        raise ExportError(f"{checkpoint}: cannot merge its --adapter {config.get('adapter')} factors ({error})") from None
    state = {key: value.to(DTYPES[dtype]) if value.is_floating_point() else value for key, value in merged.items()}

    llama_config.use_cache = True  # the run trains without a KV cache; generation wants one
    with torch.device("meta"):  # no weights allocated: the checkpoint's tensors are assigned below
        model = AutoModelForCausalLM.from_config(llama_config, dtype=DTYPES[dtype])
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not (llama_config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ExportError(f"{checkpoint} does not match its model config: missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]}; pass the run's --model_config")
    if llama_config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.use_cache = True

    temporary = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    loaded_tokenizer.save_pretrained(temporary)
    if out.exists():
        out.rmdir()  # checked empty above
    temporary.rename(out)
    return out


def push_to_hub(folder: Path, repo: str) -> None:
    """Create (if needed) the model repository `repo` and upload `folder` into it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                      commit_message="Export from the APOLLO harness (python -m train.export)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="RUN_DIR_OR_STEP", help="run folder (latest checkpoint) or a step_* folder")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write (absent or empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the run's)")
    parser.add_argument("--model_config", default=None, help="LLaMA config json (default: the run's --model_config)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the run's --tokenizer)")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="upload the folder to this hub repository")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, model_config=args.model_config,
                     tokenizer=args.tokenizer)
    except ExportError as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))", file=sys.stderr)
    if args.push_to_hub:
        try:
            push_to_hub(out, args.push_to_hub)
        except Exception as error:  # network, authentication, offline mode: one line, the folder stays
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"export: push to {args.push_to_hub} failed ({message}); the folder {out} is complete",
                  file=sys.stderr)
            return 1
        print(f"pushed {out} to {args.push_to_hub}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
