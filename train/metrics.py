"""Run metrics on rank 0: a local metrics.jsonl always, wandb when enabled, a tqdm progress bar.

Every record goes to both sinks with the same keys: `<run dir>/metrics.jsonl` gets one json object per
line with "step" added, wandb gets `run.log(metrics, step=step)`. When wandb is disabled a stand-in
with the same methods takes its place, so the training loop never asks whether wandb is on; wandb is
imported only when it is used. On other ranks the logger does nothing at all.
(Named metrics.py, not logging.py: a module named logging beside a script shadows the standard library.)

Speed: `speed_metrics` turns an update window into tokens/s per process and MFU, the model FLOPs the
window's positions cost (train.model.flops_per_token, padding included: it is computed) over the
time, divided by the device's peak (--peak_tflops, or `default_peak_tflops` from the device's name).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


# Dense bfloat16 tensor-core peaks in TFLOP/s, from the vendors' datasheets (torchtitan's table); the first
# name contained in the device's name wins, so the specific variants come before their family.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("MI300X", 1307.0), ("MI325X", 1307.0), ("MI250X", 383.0),
)


def default_peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device whose name is in PEAK_TFLOPS (e.g. 'NVIDIA H100 80GB HBM3' -> 989), else None."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_name(device: Any) -> str:
    """torch's name for a CUDA device ('NVIDIA A100-SXM4-80GB'), else the device type ('cpu')."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def speed_metrics(*, tokens: int, positions: int, seconds: float, world_size: int, flops_per_token: int,
                  peak_tflops: Optional[float]) -> dict[str, float]:
    """Tokens/s of one process and MFU over a window of updates.

    tokens: non-pad tokens over all processes; positions: sequence positions computed over all processes
    (batch x max_length per micro-batch, padding included: those FLOPs are spent). MFU = flops_per_token x
    positions / world_size / seconds / (peak_tflops x 1e12); left out when peak_tflops is None.
    """
    seconds = max(seconds, 1e-9)
    metrics = {"tokens_per_s_per_process": tokens / world_size / seconds}
    if peak_tflops:
        metrics["mfu"] = flops_per_token * positions / world_size / seconds / (peak_tflops * 1e12)
    return metrics


class NoWandb:
    """Stand-in for a wandb run when wandb is disabled (or on ranks other than 0)."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass


def start_wandb(mode: str, *, project: str, name: str, entity: str | None, config: dict[str, Any], run_dir: Path):
    """A wandb run (online or offline, files under run_dir/wandb) or the NoWandb stand-in for 'disabled'."""
    if mode == "disabled":
        return NoWandb()
    import wandb  # lazily: slow to import, and not needed when disabled

    return wandb.init(project=project, name=name, entity=entity, mode=mode, config=config, dir=str(run_dir))


def _plain(value: Any) -> Any:
    """json-safe value: NaN/inf become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Rank 0's metrics sinks and progress bar; every method is a no-op when `enabled` is False."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        *,
        wandb_mode: str,
        project: str,
        name: str,
        entity: str | None = None,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self.wandb = NoWandb()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="update",
                        disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.wandb = start_wandb(wandb_mode, project=project, name=name, entity=entity, config=config, run_dir=self.run_dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One record: a metrics.jsonl line {"step": step, **metrics} and wandb.log(metrics, step=step)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._jsonl.flush()
        self.wandb.log(metrics, step=step)

    def summarize(self, metrics: dict[str, Any]) -> None:
        """Values that describe the whole run (parameter counts, ...) into wandb's summary."""
        if self.enabled:
            for key, value in metrics.items():
                self.wandb.summary[key] = value

    def progress(self, steps: int, **postfix: float) -> None:
        """Advance the bar by `steps` updates; show `postfix` (loss, lr, tokens/s) when given."""
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(steps)

    def info(self, message: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def close(self, exit_code: int = 0) -> None:
        self.bar.close()
        if self.enabled:
            self._jsonl.close()
            self.wandb.finish(exit_code=exit_code)
