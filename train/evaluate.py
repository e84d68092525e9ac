"""Validation loss, perplexity and bits per byte: the token-weighted mean cross-entropy of PROTOCOL.md.

    loss = sum over every non-ignored target token t of -log p(t | its prefix)  /  number of such targets
    perplexity = exp(loss)
    bits_per_byte = loss x targets / (ln 2 x UTF-8 bytes of the text evaluated)
                  = (sum of -log2 p over the targets) / bytes

Bits per byte does not depend on how a tokenizer cuts the text, so runs with different tokenizers
compare. The bytes are those of the documents' text that the evaluated rows cover (`text_bytes` of
train.data.iter_eval_batches): a document kept whole counts all of its text's UTF-8 bytes (whitespace
the tokenizer drops, e.g. t5's newlines, included); a document truncated to max_length counts its text
up to the end character of the last kept text token (the fast tokenizer's offsets), not the whitespace
after it. Only rows that are scored count, so the bytes stop at the same batch as the targets. The
first token of each row is context, not a target (t5 has no BOS), yet its bytes count: on the local
C4 validation sample at max_length 256 that is 3.6 of 828 bytes per row (0.44%: bits per byte would be
0.44% higher without them); the same for every model of one tokenizer, so their comparisons are unaffected.

Targets are the next-token labels of each row (`labels[:, 1:]`, padding = -100 ignored), so a document
of n tokens contributes n - 1 targets. With torch.distributed initialised, the two sums are all-reduced
before the division, which makes the result the mean over all ranks' tokens, not a mean of rank means.
The published code instead averaged per-batch means and divided by (batches + 1); that bias is not kept.

The validation documents come in file order with no shuffle (identical on every run), tokenised by
`train.data` exactly as in training, split across ranks, and read until about `eval_tokens` targets
have been scored in total (each rank stops after its share, at a batch boundary).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.data import IGNORE_INDEX, iter_eval_batches


@dataclass
class EvalResult:
    """Token-weighted validation loss (nats per token), its exp, the number of targets scored, bits per
    byte and the UTF-8 bytes of the text those rows cover."""

    loss: float
    perplexity: float
    tokens: int
    bits_per_byte: float
    text_bytes: int
    unk_mapped: int = 0  # ids >= the model's vocab_size scored as <unk> (this rank's count)


def count_targets(labels: torch.Tensor) -> int:
    """Number of scored next-token targets in a batch: labels[:, 1:] that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy of one batch, as a float64 scalar on the batch's device."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    # Position i predicts token i+1; the last position has no target. Shifting the labels, not the
    # logits, keeps the (B, T, V) logits a view instead of copying them.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    # At least float32: a bf16 log-softmax over 32k classes loses accuracy that comparisons need.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum.double()


def evaluate(
    model: torch.nn.Module,
    *,
    tokenizer,
    data_dir,
    max_length: int,
    batch_size: int,
    eval_tokens: int = 10_000_000,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    data_format: str = "auto",
) -> EvalResult:
    """Score the validation split (see the module docstring); the model's train/eval mode is restored.

    `lockstep`: every rank runs the same number of forward passes (a sharded model all-gathers its weights
    in each one): the ranks agree before each batch and all stop when one has met its budget or run out.
    """
    if eval_tokens < 1:
        raise ValueError(f"eval_tokens {eval_tokens}: must be at least 1")
    budget = math.ceil(eval_tokens / world_size)  # this rank's share of the targets
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count, covered, unk_mapped = 0, 0, 0  # counted on the CPU copy of the labels: no device sync per batch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batches = iter_eval_batches(
                tokenizer=tokenizer,
                data_dir=data_dir,
                max_length=max_length,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                data_format=data_format,
                vocab_size=getattr(getattr(model, "config", None), "vocab_size", None),
            )
            batches = iter(batches)
            while True:
                batch = next(batches, None) if count < budget else None
                if lockstep:  # all go on only if every rank has a batch to score
                    going = torch.tensor([0.0 if batch is None else 1.0], device=device)
                    dist.all_reduce(going, op=dist.ReduceOp.MIN)
                    if going.item() == 0.0:
                        break
                elif batch is None:
                    break
                loss_sum += batch_loss_sum(model, {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
                count += count_targets(batch["labels"])
                covered += int(batch["text_bytes"].sum())
                unk_mapped += int(batch["unk_mapped"])
    finally:
        model.train(was_training)
    counts = torch.tensor([float(count), float(covered)], dtype=torch.float64, device=device)  # exact below 2**53
    totals = torch.cat([loss_sum.reshape(1), counts])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    tokens, text_bytes = int(totals[1].item()), int(totals[2].item())
    if tokens == 0 or text_bytes == 0:
        raise ValueError(f"validation data in {data_dir or 'the hub'} gave no target tokens at max_length {max_length}")
    loss = totals[0].item() / tokens
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=tokens,
                      bits_per_byte=totals[0].item() / (math.log(2) * text_bytes), text_bytes=text_bytes,
                      unk_mapped=unk_mapped)
