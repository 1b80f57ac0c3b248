"""What happens around the steps, as callbacks with three hooks: `on_start` (after setup, before
the first step), `on_step` (after each step, with its record) and `on_end` (after the last).

`default_callbacks` gives the trainer's, in the order they run: metrics (log, console, the
non-finite teacher warning), the non-finite guard, checkpoint cadence (and the stop-signal
checkpoint), the HF export, the run manifest. A callback may raise to stop the run: the guard
raises `TrainingStopped`, the checkpoint callback `TrainingInterrupted` after a stop signal.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from megatron_lopd.errors import LopdError

log = logging.getLogger("megatron_lopd.train")


class TrainingStopped(LopdError):
    """Training cannot continue (too many non-finite steps in a row)."""

    all_ranks = True


class TrainingInterrupted(LopdError):
    """A stop signal arrived; a checkpoint was written and the run can be resumed."""

    all_ranks = True

    def __init__(self, what: str, fix: str, exit_code: int):
        super().__init__(what, fix)
        self.exit_code = exit_code


class Callback:
    def on_start(self, trainer) -> None: ...
    def on_step(self, trainer, record: dict[str, Any]) -> None: ...
    def on_end(self, trainer, summary) -> None: ...
    def close(self) -> None: ...


class Metrics(Callback):
    """metrics.jsonl, console, TensorBoard, W&B (`metrics_log.MetricsLogger`), and the run's first lines."""

    def on_start(self, trainer) -> None:
        from megatron_lopd.runtime.files import atomic_write
        from megatron_lopd.training.metrics_log import MetricsLogger

        cfg, lg = trainer.config, trainer.config.logging
        trainer.logger = self.logger = MetricsLogger(
            trainer.run_dir, enabled=trainer.is_logging_rank, total_steps=trainer.total_steps, log_every=lg.log_every,
            tensorboard=lg.tensorboard, wandb_project=lg.wandb_project, wandb_entity=lg.wandb_entity,
            wandb_run_name=lg.wandb_run_name, run_config=cfg.to_dict(), progress=lg.progress, start_step=trainer.step,
        )
        if not trainer.is_logging_rank:
            return
        atomic_write(trainer.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        for key, (old, new) in trainer.checks.resume_changes.items():
            self.logger.console(f"resume: {key} {old!r} -> {new!r} (from step {trainer.step + 1}; recorded in manifest.json)")
        for w in trainer.checks.consistency_warnings:
            banner = "!" * 100
            self.logger.console(f"{banner}\nRESEARCH OPT-OUT: {w}\n(recorded in {trainer.run_dir / 'manifest.json'})\n{banner}")
            log.warning("teacher-consistency opt-out: %s", w)
        q, resume_from = trainer.start.qwen3, trainer.checks.resume_from
        where = f"resumed from {resume_from} at step {trainer.step}" if resume_from else f"from {trainer.start.path or cfg.model.named}"
        self.logger.console(
            f"lopd train: loss={cfg.loss}, {q.num_params() / 1e6:.1f}M params, {trainer.precision}"
            f"{', fp8 ' + cfg.model.fp8 if cfg.model.fp8 else ''}, TP={trainer.tp_size} PP={cfg.parallel.pipeline_parallel} "
            f"DP={trainer.dp_size}, {len(trainer.data)} sequences, global batch {cfg.data.global_batch}, "
            f"{trainer.total_steps} steps, {where}"
        )

    def on_step(self, trainer, record) -> None:
        if record["teacher_nonfinite"]:
            self.logger.console(
                f"WARNING: {trainer.source.path}: {record['teacher_nonfinite']} response tokens of step {record['step']} have NaN/inf "
                f"teacher log-probs (the step's sequences: {sorted(trainer.last_batch.global_indices.tolist())}); the step is skipped. "
                "Check the store with `lopd store verify` and rescore the damaged sequences."
            )
        self.logger.log(record)

    def close(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()


class NonFiniteGuard(Callback):
    """`max_consecutive_nonfinite` skipped steps in a row stop the run with a clear message."""

    def __init__(self):
        self.consecutive = 0

    def on_step(self, trainer, record) -> None:
        self.consecutive = self.consecutive + 1 if record["skipped"] else 0
        if self.consecutive >= trainer.config.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"training stopped at step {trainer.step}: {self.consecutive} steps in a row had a NaN/inf loss or gradient "
                f"({trainer.nonfinite_steps} skipped in total)",
                (f"the teacher store has NaN/inf log-probs ({trainer.source.path}): run `lopd store verify` and rescore; "
                 if record["teacher_nonfinite"] else "lower optimizer.lr, check the data, ")
                + f"or resume from the last good checkpoint in {trainer.ckpt_root}",
            )


class Checkpoints(Callback):
    """Every `checkpoint.save_every` steps, at the last step, and after a stop signal (then the
    manifest says interrupted and every rank leaves with `TrainingInterrupted`)."""

    def on_step(self, trainer, record) -> None:
        every, last, stop = trainer.config.checkpoint.save_every, trainer.step == trainer.total_steps, trainer.agreed_stop_signal
        if last or stop or (every and trainer.step % every == 0):
            trainer.final_checkpoint = trainer.save_checkpoint()
        if stop and not last:
            name = signal.Signals(stop).name
            if trainer.is_logging_rank:
                trainer.manifest.write(trainer, status="interrupted", final_step=trainer.step, final_checkpoint=str(trainer.final_checkpoint), stop_signal=name)
            raise TrainingInterrupted(
                f"training stopped by {name} at step {trainer.step} of {trainer.total_steps}: checkpoint {trainer.final_checkpoint} written",
                "rerun the same command to resume (slurm/lightning_opd_8b.sh requeues its job itself)",
                exit_code=128 + stop)

    def on_end(self, trainer, summary) -> None:
        from megatron_lopd.training.checkpointing import find_latest

        summary.final_checkpoint = trainer.final_checkpoint or find_latest(trainer.ckpt_root)


class HfExport(Callback):
    """`checkpoint.export_hf`: the final model as a Hugging Face dir, `<run_dir>/hf`, recorded in the checkpoint."""

    def on_end(self, trainer, summary) -> None:
        from megatron_lopd.models import checkpoint as mckpt
        from megatron_lopd.provenance import model_fingerprint
        from megatron_lopd.training.checkpointing import record_hf_export

        if not trainer.config.checkpoint.export_hf:
            return
        out = trainer.run_dir / "hf"
        if trainer.is_logging_rank and out.exists():
            shutil.rmtree(out)
        torch.distributed.barrier()
        dtype = trainer.config.model.export_dtype
        mckpt.export_model_to_hf(trainer.inner_model, trainer.start.qwen3, trainer.start.tokenizer_dir, out,
                                 dtype=None if dtype == "auto" else dtype)
        torch.distributed.barrier()
        summary.hf_export = out
        if trainer.is_logging_rank:
            trainer.hf_fingerprint = model_fingerprint(out)
            if summary.final_checkpoint is not None:
                record_hf_export(summary.final_checkpoint, out, trainer.hf_fingerprint)
            trainer.logger.console(f"exported the final model to {out} ({trainer.hf_fingerprint})")


class RunManifest(Callback):
    """The run dir's manifest.json: status running / interrupted / complete, the inputs' provenance,
    the layout, the consistency opt-outs and every resume with the settings it changed."""

    def __init__(self):
        self.resumes: list[dict[str, Any]] = []

    def on_start(self, trainer) -> None:
        if not trainer.is_logging_rank:
            return
        checks = trainer.checks
        if checks.resume_from is not None:  # the resume history up to the checkpoint
            resumes = recorded_extra(trainer.run_dir).get("resumes")
            self.resumes = [r for r in resumes if isinstance(r, dict) and r.get("step", 0) < trainer.step] if isinstance(resumes, list) else []
            self.resumes.append({"step": trainer.step, "checkpoint": str(checks.resume_from), "changes": checks.resume_changes})
        self.write(trainer, status="running")

    def on_end(self, trainer, summary) -> None:
        if trainer.is_logging_rank:
            self.write(trainer, status="complete", final_step=trainer.step,
                       final_checkpoint=str(summary.final_checkpoint) if summary.final_checkpoint else None,
                       hf_export=str(summary.hf_export) if summary.hf_export else None,
                       hf_fingerprint=trainer.hf_fingerprint if summary.hf_export else None,
                       nonfinite_steps=trainer.nonfinite_steps, teacher_nonfinite_steps=trainer.teacher_nonfinite_steps)

    def write(self, trainer, *, status: str, **extra) -> None:
        from megatron_lopd.provenance import Manifest

        cfg, tc = trainer.config, trainer.config.teacher_consistency
        Manifest(
            kind="run",
            producer={"trainer": "megatron_lopd.training.loop", "loss": cfg.loss},
            inputs=trainer.checks.inputs,
            params=cfg.to_dict(),
            extra={
                "status": status,
                "layout": {"tensor_parallel": trainer.tp_size, "pipeline_parallel": cfg.parallel.pipeline_parallel, "data_parallel": trainer.dp_size},
                "precision": trainer.precision,
                "consistency_opt_out": {"allow_inconsistent_teacher": tc.allow_inconsistent_teacher, "allow_policy_mismatch": tc.allow_policy_mismatch},
                "consistency_warnings": trainer.checks.consistency_warnings,
                "resumes": self.resumes,
                **extra,
            },
        ).write(trainer.run_dir)


def recorded_extra(run_dir: Path) -> dict[str, Any]:
    """`extra` of the run dir's manifest.json as a previous invocation left it ({} if none)."""
    from megatron_lopd.provenance import MANIFEST_NAME

    try:
        extra = json.loads((Path(run_dir) / MANIFEST_NAME).read_text())["extra"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return extra if isinstance(extra, dict) else {}


def default_callbacks() -> list[Callback]:
    return [Metrics(), NonFiniteGuard(), Checkpoints(), HfExport(), RunManifest()]
