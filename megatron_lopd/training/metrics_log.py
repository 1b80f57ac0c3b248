"""Per-step metrics: metrics.jsonl (always), console, TensorBoard, W&B (when configured).

`metrics.jsonl` in the run directory holds one JSON object per optimizer step (skipped
steps included, flagged); the keys are listed in `METRIC_KEYS` and documented in
docs/training.md. A value that does not apply to the run (e.g. `kl_to_teacher` for SFT, `mfu` on
CPU) is null. On resume the file is cut back to the checkpoint's step, so it keeps
exactly one line per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from megatron_lopd.runtime.files import atomic_write

METRICS_FILE = "metrics.jsonl"

# key -> meaning (docs/training.md's metrics table is generated from this).
METRIC_KEYS: dict[str, str] = {
    "step": "optimizer step, 1-based",
    "loss": "the training loss: per-sequence mean over response tokens, then mean over the global batch",
    "kl_to_teacher": "mean over response tokens of lpS - lpT of the sampled token, on this step's batch before the update",
    "reverse_kl": "mean k3 estimate (r - 1) - log r, r = exp(lpT - lpS): non-negative estimate of KL(S || T)",
    "top1_agreement": "fraction of response positions where the student's argmax is the teacher's top-1 (needs stored top-k)",
    "drift_chi2": "mean (w - 1)^2, w = exp(lpS - lpR): chi-square of the student from the rollout policy (needs rollout log-probs)",
    "drift_kl": "mean w log w - w + 1: KL(S || R) estimate from the stored rollout log-probs",
    "entropy": "mean student entropy at response positions",
    "grad_norm": "global gradient norm before clipping",
    "lr": "learning rate used by this step's update",
    "tokens": "real (non-padding) tokens processed this step, all ranks",
    "loss_tokens": "response tokens in the loss this step, all ranks",
    "sequences": "sequences in this step's global batch",
    "tokens_per_s": "tokens / step wall time",
    "step_time_s": "wall time of the step (data wait, forward, backward, optimizer)",
    "mfu": "model FLOPs utilisation on GPU (null on CPU or an unknown device): the step's training FLOPs (attention per packed sequence) / step time / (GPUs * dense peak)",
    "skipped": "true when the loss or gradient was NaN/inf and the update was skipped",
    "teacher_nonfinite": "response tokens of this step with a NaN/inf teacher log-prob (the step is then skipped)",
    "nonfinite_steps": "skipped steps so far in the run",
    "consumed_sequences": "data position after this step (sequences of the shuffled stream)",
    "epoch": "epochs of the data consumed (fractional)",
}

# Dense (not sparse) peak TFLOP/s per GPU, from the spec sheets: (fragment of
# torch.cuda.get_device_name(), bf16, fp8). First match wins: the PCIe / NVL variants of a chip
# come before its SXM name, which they contain ("NVIDIA H100 PCIe" vs "NVIDIA H100 80GB HBM3").
_PEAK_TFLOPS = (
    ("H100 PCIE", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H800 PCIE", 756.0, 1513.0),
    ("GH200", 989.0, 1979.0),
    ("H100", 989.0, 1979.0),
    ("H200", 989.0, 1979.0),
    ("H800", 989.0, 1979.0),
    ("B200", 2250.0, 4500.0),
    ("A100", 312.0, None),  # no FP8 units
)


def peak_tflops(device_name: str, precision: str, override: float = 0.0) -> float | None:
    """Per-GPU dense peak for the MFU denominator (`precision`: bf16 | fp8); None when unknown:
    MFU is then null, and a one-time hint says how to set it."""
    if override > 0:
        return override
    name = device_name.upper()
    for fragment, bf16, fp8 in _PEAK_TFLOPS:
        if fragment in name:
            return bf16 if precision == "bf16" else fp8
    logging.getLogger("megatron_lopd.train").warning(
        "MFU is not logged: no peak TFLOP/s known for %r; set logging.peak_tflops=<dense %s TFLOP/s per GPU>", device_name, precision)
    return None


def mfu(train_flops_per_s: float, num_gpus: int, peak_tflops_per_gpu: float | None) -> float | None:
    """Model FLOPs utilisation: the step's training FLOPs per second over the GPUs' peak."""
    if not peak_tflops_per_gpu or train_flops_per_s <= 0:
        return None
    return train_flops_per_s / (num_gpus * peak_tflops_per_gpu * 1e12)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (a resumed run rewrites what came after its checkpoint).

    A line cut short by a kill is dropped too.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if keep == lines:
        return  # nothing after the checkpoint: the file is left as it is
    atomic_write(path, "".join(line + "\n" for line in keep))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


_CONSOLE = (
    ("loss", "loss"),
    ("kl_to_teacher", "kl"),
    ("top1_agreement", "top1"),
    ("drift_chi2", "chi2"),
    ("drift_kl", "dkl"),
    ("grad_norm", "gnorm"),
    ("lr", "lr"),
)


class MetricsLogger:
    """Writes one record per step. Only the logging rank (global rank 0) creates one with `enabled`."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        log_every: int = 1,
        tensorboard: bool = True,
        wandb_project: str = "",
        wandb_entity: str = "",
        wandb_run_name: str = "",
        run_config: dict | None = None,
        progress: bool = True,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.log_every = log_every
        self._tb = self._wandb = self._bar = self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(
                project=wandb_project,
                entity=wandb_entity or None,
                name=wandb_run_name or self.run_dir.name,
                dir=str(self.run_dir),
                config=run_config,
                resume="allow",
                id=_wandb_id(self.run_dir),
            )
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = record["step"]
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"loss {_fmt(record.get('loss'))} | {_fmt(record.get('tokens_per_s'))} tok/s")
        if step % self.log_every == 0 or step == self.total_steps or record.get("skipped"):
            parts = [f"step {step}/{self.total_steps}"]
            parts += [f"{label} {_fmt(record.get(key))}" for key, label in _CONSOLE if record.get(key) is not None]
            parts.append(f"{_fmt(record.get('tokens_per_s'))} tok/s")
            if record.get("mfu") is not None:
                parts.append(f"mfu {100 * record['mfu']:.1f}%")
            if record.get("skipped"):
                parts.append("SKIPPED (non-finite)")
            self.console(" | ".join(parts))

    def console(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        for thing in (self._bar, self._tb, self._file):
            if thing is not None:
                thing.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = self._bar = self._file = None


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    path = run_dir / ".wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = f"lopd-{int(time.time())}-{os.getpid()}"
    path.write_text(run_id)
    return run_id
