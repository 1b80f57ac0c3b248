"""The run directory: ours, one writer at a time, and a record that tells the truth.

Three rules, checked on rank 0 before any compute:

- A run dir is new, empty (but for `logs/`, where slurm/ scripts log), or a run dir of ours
  (its `manifest.json` is of kind "run"), and
  never an input of the same run (the start checkpoint, the store, the SFT data): training
  into a Hugging Face model directory would overwrite its config.json.
- One writer per run dir: `OutputLock` (a job submitted twice is refused while the first
  lives; the lock of a dead or requeued job is taken over).
- The recorded config is the config used. A resume compares the config and the inputs'
  fingerprints with what the checkpoint recorded. Some fields may change freely (how long to
  train, checkpoint cadence, logging, memory knobs), the parallel layout when the checkpoint
  can be resharded to it, a few only when named in `checkpoint.resume_changes` (then applied
  and logged), and the rest are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ArtifactError, ConfigError

log = logging.getLogger("megatron_lopd.train")

RUN_KIND = "run"
# May differ between a checkpoint and its resume: they change neither the model nor the data
# order (micro-batching, recompute, sequence parallel, optimizer offload and precision-aware
# Adam: memory and speed, the same math up to rounding).
FREE_ON_RESUME = (
    "run_dir", "train_steps", "epochs", "max_consecutive_nonfinite", "checkpoint.", "logging.",
    "data.prefetch", "data.micro_batch_size", "data.micro_batch_tokens", "data.trim_padding", "data.pad_to_multiple",
    "model.recompute", "model.export_dtype", "parallel.sequence_parallel",
    "optimizer.cpu_offload", "optimizer.cpu_offload_fraction", "optimizer.overlap_cpu_offload", "optimizer.precision_aware",
    "model.start_from", "data.store", "data.sft_data",  # compared by content fingerprint below, not by path
)
# The model's parallel layout: free when the checkpoint's optimizer state can be resharded to
# it (checkpointing.check_resume_layout), refused otherwise. Data parallel follows the launch.
LAYOUT_ON_RESUME = ("parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.expert_parallel",
                    "parallel.expert_tensor_parallel")
# May change on resume when named in checkpoint.resume_changes; applied to the optimizer.
CHANGEABLE_ON_REQUEST = ("optimizer.lr", "optimizer.min_lr", "optimizer.clip_grad", "optimizer.weight_decay")
# The inputs' content fingerprints in the run's provenance record.
_INPUT_FINGERPRINTS = ("start_fingerprint", "teacher_fingerprint", "rollouts_fingerprint", "sft_data_fingerprint",
                       "sft_data_generator", "store_tokenizer", "rollout_policy")


def _inputs(config) -> dict[str, Path]:
    named = {"model.start_from": config.model.start_from, "data.store": config.data.store, "data.sft_data": config.data.sft_data}
    return {k: Path(v).resolve() for k, v in named.items() if v}


def check_run_dir(config) -> None:
    """Refuse a run dir that is someone else's directory or an input of this run (no writes)."""
    run_dir = Path(config.run_dir).resolve()
    for key, path in _inputs(config).items():
        if run_dir == path or path in run_dir.parents or run_dir in path.parents:
            raise ConfigError(
                f"run_dir={config.run_dir} overlaps {key}={path}: a run never writes into its own inputs",
                "choose a run_dir outside the model, store and SFT data directories")
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"run_dir={run_dir} is a file", "pass a directory path as run_dir")
    if not run_dir.is_dir():
        return
    from megatron_lopd.provenance import MANIFEST_NAME
    from megatron_lopd.runtime.files import LOCK_NAME

    # A fresh run dir may already hold our lock and the sbatch script's per-job logs/.
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME and not (p.name == "logs" and p.is_dir()))
    if not entries:
        return
    try:
        kind = json.loads((run_dir / MANIFEST_NAME).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != RUN_KIND:
        what = "a Hugging Face model" if "config.json" in entries and kind is None else f"not a training run ({', '.join(entries[:5])})"
        raise ArtifactError(
            f"run_dir={run_dir} is {what}; training would overwrite its files",
            "choose a new or empty run_dir (a run dir holds a manifest.json of kind 'run')")


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value} (what resumes and pipeline staleness compare)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(checkpoint: Path, trainer_state: dict[str, Any], config, inputs: dict[str, Any]) -> dict[str, list]:
    """Compare what `checkpoint` was trained with to what this run asks for.

    Returns the changes to apply (key -> [old, new]) from `CHANGEABLE_ON_REQUEST` that
    `checkpoint.resume_changes` names, plus the free ones and a parallel layout the checkpoint
    can be resharded to (recorded only). Raises ConfigError for any other change, one line
    naming the first key with both values (or both layouts) and the fix.
    """
    recorded_cfg, recorded_inputs = trainer_state.get("config"), trainer_state.get("inputs")
    if recorded_cfg is None:
        log.warning("%s records no config (written by an older version): settings not compared on resume", checkpoint)
        return {}
    requested = {k.strip() for k in config.checkpoint.resume_changes.split(",") if k.strip()}
    unknown = sorted(requested - set(CHANGEABLE_ON_REQUEST))
    if unknown:
        raise ConfigError(f"checkpoint.resume_changes names {', '.join(unknown)}, which a resume cannot change",
                          f"name only {', '.join(CHANGEABLE_ON_REQUEST)}")
    old, new = flatten_config(recorded_cfg), flatten_config(config.to_dict())
    changes: dict[str, list] = {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        changes[key] = [old.get(key), new.get(key)]
        if key.startswith(FREE_ON_RESUME) or key in requested or key in LAYOUT_ON_RESUME:
            continue
        fix = (f"resume with {key}={old.get(key)} and name it in checkpoint.resume_changes={key} to change it"
               if key in CHANGEABLE_ON_REQUEST else
               f"resume with {key}={old.get(key)!r}, or start a new run_dir with model.start_from={checkpoint}")
        raise ConfigError(f"{checkpoint}: was trained with {key}={old.get(key)!r}, this run asks for {new.get(key)!r}", fix)
    from megatron_lopd.training.checkpointing import METADATA_NAME, check_resume_layout

    meta = json.loads((Path(checkpoint) / METADATA_NAME).read_text())  # preflight has read and checked it
    check_resume_layout(checkpoint, meta, {key.split(".")[1]: new.get(key) for key in LAYOUT_ON_RESUME})
    for key in _INPUT_FINGERPRINTS:
        a, b = (recorded_inputs or {}).get(key), inputs.get(key)
        if recorded_inputs is not None and a != b:
            raise ConfigError(
                f"{checkpoint}: was trained on inputs with {key}={a}, this run's inputs have {b}",
                f"resume with the original inputs, or start a new run_dir with model.start_from={checkpoint}")
    return changes


def apply_optimizer_changes(changes: dict[str, list], optimizer, scheduler) -> None:
    """Make the requested optimizer changes effective after the checkpoint's state was loaded
    (its scheduler and param groups would otherwise keep the old values)."""
    lr, min_lr = changes.get("optimizer.lr"), changes.get("optimizer.min_lr")
    if lr:
        scheduler.max_lr = float(lr[1])
        if scheduler.lr_decay_style == "constant":
            scheduler.min_lr = float(lr[1])
        scheduler.init_lr = min(scheduler.init_lr, scheduler.max_lr)
    if min_lr and scheduler.lr_decay_style != "constant":
        scheduler.min_lr = float(min_lr[1])
    if "optimizer.weight_decay" in changes:
        scheduler.start_wd = scheduler.end_wd = float(changes["optimizer.weight_decay"][1])
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    if "optimizer.clip_grad" in changes:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            opt.config.clip_grad = float(changes["optimizer.clip_grad"][1])
    scheduler.step(0)  # set the param groups' lr / wd from the new values now


def verify_finished_run(path: str | Path) -> str:
    """A finished training run: its manifest says complete and its latest checkpoint is there."""
    from megatron_lopd.provenance import Manifest
    from megatron_lopd.training.checkpointing import find_latest, read_metadata

    path = Path(path)
    manifest = Manifest.read(path, kind=RUN_KIND)
    if manifest.extra.get("status") != "complete":
        raise ArtifactError(f"{path}: training run is {manifest.extra.get('status', 'unfinished')}", "rerun the stage: it resumes from the latest checkpoint")
    latest = find_latest(path / "checkpoints")
    if latest is None:
        raise ArtifactError(f"{path}: no checkpoint (checkpoints/latest is missing)", "rerun the training stage")
    return f"{latest.name}, step {read_metadata(latest).get('iteration')}"


def verify_run_export(hf_dir: str | Path) -> str:
    """A finished run's own HF export (`<run>/hf`), the one its manifest recorded."""
    from megatron_lopd.provenance import Manifest, cached_model_fingerprint, check_hf_files

    hf_dir = Path(hf_dir)
    run_dir = hf_dir.parent
    detail = verify_finished_run(run_dir)
    check_hf_files(hf_dir)
    recorded = Manifest.read(run_dir, kind=RUN_KIND).extra.get("hf_fingerprint")
    actual = cached_model_fingerprint(hf_dir)
    if recorded != actual:
        raise ArtifactError(f"{hf_dir}: HF export does not match the run's record ({recorded} vs {actual})", "rerun the SFT stage (it resumes and re-exports)")
    return f"{detail}, export {actual}"
