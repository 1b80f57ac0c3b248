"""The training loop on megatron-core: `train(config) -> RunSummary`.

One loop for SFT, Lightning OPD and the top-k losses; what differs between them is the loss
(`losses.LossSpec`: what it reads) and the data (`data.DataProvider`: the store, the SFT
artifact, or the demo's online stream). The pieces, each in its own module:

- `preflight`: every check before compute (rank 0; the same function as `lopd pipeline check-train`);
- `step.TrainStep`: one optimizer step in megatron-core's schedule contract;
- `callbacks`: metrics, the non-finite guard, checkpoints, the HF export, the run manifest.

`Trainer.setup` initialises the process groups, runs the preflight on rank 0 (every rank raises
its error), builds the model, the data stream and the optimizer, and resumes; `Trainer.run`
steps until `total_steps`, calling the callbacks. SIGTERM / SIGUSR1 finish the current step,
checkpoint and leave with `TrainingInterrupted` (exit 128 + signal).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError, LopdError
from megatron_lopd.training.callbacks import Checkpoints, HfExport, Metrics, NonFiniteGuard, RunManifest, recorded_extra
from megatron_lopd.training.config import TrainConfig


@dataclass
class RunSummary:
    run_dir: Path
    last_step: int
    losses: dict[int, float]  # step -> loss, for the steps this invocation ran
    records: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Path | None = None
    final_checkpoint: Path | None = None
    hf_export: Path | None = None
    nonfinite_steps: int = 0
    teacher_nonfinite_steps: int = 0  # of those, steps skipped for NaN/inf teacher log-probs
    consistency_warnings: list[str] = field(default_factory=list)
    mean_tokens_per_s: float = 0.0
    mean_step_time_s: float = 0.0


class Trainer:
    """One run: `setup()`, then `run()`. `data`: where the data comes from (default: the store or
    the SFT artifact the config names); `callbacks`: extra ones, after the default five."""

    def __init__(self, config: TrainConfig, data=None, callbacks=()):
        from megatron_lopd.training.data import OfflineData

        self.config = config.validate()
        self.data_provider = data or OfflineData()
        self.run_dir = Path(config.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.logger = self.data = self.lock = None  # lock: rank 0's OutputLock on the run dir
        self.manifest = RunManifest()
        self.callbacks = [Metrics(), NonFiniteGuard(), Checkpoints(), HfExport(), self.manifest, *callbacks]
        self.stop_signal: int | None = None  # set by SIGTERM / SIGUSR1 (install_stop_handlers)
        self.agreed_stop_signal = 0  # the largest stop signal any rank got, known to all after each step
        self.final_checkpoint: Path | None = None
        self.hf_fingerprint: str | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_lopd.runtime import device, init_distributed
        from megatron_lopd.training.metrics_log import peak_tflops, truncate_metrics
        from megatron_lopd.training.preflight import check_environment, precision
        from megatron_lopd.training.step import TrainStep

        cfg = self.config
        check_environment(cfg)
        self.info = init_distributed(cfg.parallel.runtime(), seed=cfg.seed)
        self.device = device()
        self.rank = torch.distributed.get_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.is_logging_rank = self.rank == 0
        self.precision = precision(cfg)
        # The run dir, provenance, bad input and the resume's settings: rank 0 checks, every rank raises the same error.
        self.checks = self._on_rank0_then_share(self._preflight)
        self.start, self.source = self.checks.start, self.checks.source
        self._build_model()
        self.data = self.data_provider.stream(self)
        self.total_steps = max(1, math.ceil(cfg.epochs * len(self.data) / cfg.data.global_batch)) if cfg.epochs > 0 else cfg.train_steps
        self.build_optimizer()
        on_gpu = torch.cuda.is_available()
        self.step_fn = TrainStep(
            cfg, self.model, self.optimizer, self.scheduler, self.device,
            tp_group=ps.get_tensor_model_parallel_group() if self.tp_size > 1 else None, vocab_size=self.start.qwen3.vocab_size,
            use_te=self.use_te, is_last_stage=self.is_last_stage, flops_per_token=self.start.qwen3.flops_per_token,
            peak_tflops=peak_tflops(torch.cuda.get_device_name(), "fp8" if cfg.model.fp8 else "bf16", cfg.logging.peak_tflops) if on_gpu else None,
            stop_signal=lambda: self.stop_signal or 0,
        )
        self.step, self.nonfinite_steps, self.teacher_nonfinite_steps = 0, 0, 0
        if self.checks.resume_from is not None:
            self._resume()
        elif self.is_logging_rank:
            truncate_metrics(self.run_dir, 0)  # an attempt killed before its first checkpoint
        # A finished run asked again with the same settings: nothing to train, nothing to rewrite.
        self.already_complete = self.step >= self.total_steps and recorded_extra(self.run_dir).get("status") == "complete"

    def _preflight(self):
        """Rank 0: `preflight.preflight`, with the run dir checked writable and locked (for the
        whole run) as soon as it is known to be ours."""
        from megatron_lopd.runtime.files import LOCK_NAME, OutputLock, check_writable_dir
        from megatron_lopd.training.preflight import preflight

        def claim_run_dir():
            check_writable_dir(self.run_dir, "run_dir")
            self.lock = OutputLock(self.run_dir / LOCK_NAME, "run dir").acquire()

        return preflight(self.config, self.data_provider, world_size=torch.distributed.get_world_size(), claim=claim_run_dir)

    def _on_rank0_then_share(self, fn):
        """Run fn on rank 0 (file hashing, store opening); share success or the error."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except LopdError as exc:
                base = next(c for c in type(exc).__mro__ if c in (ArtifactError, ConfigError, ConsistencyError, LopdError))
                error = (base.__name__, exc.what, exc.fix)
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            kind, what, fix = box[0]
            exc = {c.__name__: c for c in (ArtifactError, ConfigError, ConsistencyError)}.get(kind, LopdError)(what, fix)
            exc.all_ranks = True  # the CLI prints it on rank 0 only
            raise exc
        # The findings travel without the opened source (no re-hashing of a large checkpoint on
        # every rank); every rank opens the data itself (the checks already passed on rank 0).
        if self.rank == 0:
            source, result.source = result.source, None
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        checks = box[0]
        checks.source = source if self.rank == 0 else self.data_provider.reopen(self.config)
        return checks

    def _build_model(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.transformer.module import Float16Module

        from megatron_lopd.models.qwen3 import build_model, te_available

        cfg = self.config
        bf16 = self.precision == "bf16"
        use_te = {"auto": None, "true": True, "false": False}[cfg.model.use_te]
        self.use_te = te_available() if use_te is None else use_te
        model = build_model(
            self.start.qwen3,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=self.is_last_stage,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            bf16=bf16,
            fp8=cfg.model.fp8 or None,
            sequence_parallel=cfg.parallel.sequence_parallel,
            recompute=cfg.model.recompute or None,
            use_te=use_te,
        )
        if self.checks.resume_from is None and self.start.kind != "named":
            self._load_start_weights(model)
        tconfig = model.config
        if cfg.model.fp8 == "delayed":
            tconfig.fp8_amax_history_len = cfg.model.fp8_amax_history_len
            tconfig.fp8_amax_compute_algo = "max"
        # Loss contributions are globally normalised already: no rescaling by Megatron.
        tconfig.calculate_per_token_loss = True
        self.inner_model = model
        if bf16:
            model = Float16Module(tconfig, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            average_in_collective=False,
        )
        self.model = DistributedDataParallel(tconfig, ddp_config, model)
        tconfig.no_sync_func = self.model.no_sync
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.grad_scale_func = None
        self.tconfig = tconfig

    def build_optimizer(self) -> None:
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, s = self.config.optimizer, self.config.schedule
        # No gloo groups exist on GPU runs (runtime.init_distributed): the optimizer must not ask for them.
        self.optimizer = get_megatron_optimizer(megatron_optimizer_config(self.config, self.precision), [self.model],
                                                use_gloo_process_groups=not torch.cuda.is_available())
        decay = s.decay_steps or self.total_steps
        warmup = s.warmup_steps or round(s.warmup_fraction * decay)
        # The update of step n (1-based) uses the scheduler's value at num_steps = n: warmup
        # reaches the peak at step `warmup`, cosine reaches min_lr at step `decay`.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr if s.kind == "cosine" else o.lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(decay, warmup + 1),
            lr_decay_style=s.kind,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(decay, 1),
            wd_incr_style="constant",
        )

    def _load_start_weights(self, model) -> None:
        """Before DDP and the optimizer exist, so their buffers and main params start from these weights."""
        from megatron_lopd.models import checkpoint as mckpt

        if self.start.kind == "hf":
            mckpt.load_hf_weights(model, self.start.path)
        else:
            mckpt.load_checkpoint(self.start.path, model)

    def _resume(self) -> None:
        from megatron_lopd.training import checkpointing
        from megatron_lopd.training.metrics_log import truncate_metrics
        from megatron_lopd.training.run_dir import apply_optimizer_changes

        resume_from = self.checks.resume_from
        state = checkpointing.load_training_checkpoint(resume_from, model=self.model.module, optimizer=self.optimizer)
        if state.get("loss") != self.config.loss:
            raise ConfigError(
                f"{resume_from}: was trained with loss {state.get('loss')!r}, this run uses {self.config.loss!r}",
                "resume with the same loss, or start a new run_dir with model.start_from=" + str(resume_from),
            )
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.teacher_nonfinite_steps = int(state.get("teacher_nonfinite_steps", 0))
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        if self.checks.resume_changes:
            apply_optimizer_changes(self.checks.resume_changes, self.optimizer, self.scheduler)
        if self.is_logging_rank:
            truncate_metrics(self.run_dir, self.step)
        torch.distributed.barrier()

    # ------------------------------------------------------------------ the loop
    def train_step(self, batch) -> dict[str, Any]:
        """One optimizer step on `batch` (a StepBatch); returns its metrics record."""
        self.step_fn.config = self.config  # read per step: the step-time benchmark swaps it (and the data)
        record = self.step_fn(batch, self.step + 1)
        self.agreed_stop_signal = record.pop("stop_signal")
        return record

    def run(self) -> RunSummary:
        from megatron_lopd.training.checkpointing import find_latest

        summary = RunSummary(self.run_dir, self.step, {}, resumed_from=self.checks.resume_from,
                             consistency_warnings=self.checks.consistency_warnings)
        if self.already_complete:
            summary.final_checkpoint = find_latest(self.ckpt_root)
            summary.nonfinite_steps, summary.teacher_nonfinite_steps = self.nonfinite_steps, self.teacher_nonfinite_steps
            if self.is_logging_rank:
                print(f"lopd train: {self.run_dir} is complete at step {self.step} (train_steps {self.total_steps}); "
                      "nothing to train (raise train_steps to extend it)", flush=True)
            return summary
        for callback in self.callbacks:
            callback.on_start(self)
        while self.step < self.total_steps:
            t_wait = time.perf_counter()
            batch = self.last_batch = self.data.next_step()
            batch.wait_s = time.perf_counter() - t_wait
            record = self.train_step(batch)
            self.step += 1
            self.nonfinite_steps += record["skipped"]
            self.teacher_nonfinite_steps += record["skipped"] and bool(record["teacher_nonfinite"])
            record.update(nonfinite_steps=self.nonfinite_steps, consumed_sequences=self.data.consumed, epoch=self.data.consumed / len(self.data))
            summary.records.append(record)
            summary.losses[self.step] = record["loss"]
            for callback in self.callbacks:
                callback.on_step(self, record)
        summary.last_step = self.step
        summary.nonfinite_steps, summary.teacher_nonfinite_steps = self.nonfinite_steps, self.teacher_nonfinite_steps
        timed = summary.records[1:] or summary.records  # the first step includes warm-up
        if timed:
            summary.mean_step_time_s = sum(r["step_time_s"] for r in timed) / len(timed)
            summary.mean_tokens_per_s = sum(r["tokens"] for r in timed) / max(sum(r["step_time_s"] for r in timed), 1e-9)
        for callback in self.callbacks:
            callback.on_end(self, summary)
        return summary

    def install_stop_handlers(self):
        """SIGTERM (SLURM's preemption and time-limit signal, torchrun's shutdown) and SIGUSR1
        (`sbatch --signal=USR1@SECONDS`): finish the current step, checkpoint, exit. Returns a
        function that restores the previous handlers. Only the main thread can install them."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, _frame):
            if self.stop_signal is None:
                self.stop_signal = signum
                print(f"lopd train: received {signal.Signals(signum).name}: checkpointing after the current step, then exiting",
                      file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def save_checkpoint(self) -> Path:
        from megatron_lopd.training import checkpointing

        return checkpointing.save_training_checkpoint(
            self.ckpt_root,
            self.step,
            model=self.model.module,  # unwrapped: checkpoint keys without DDP's "module." prefix
            optimizer=self.optimizer,
            qwen3=self.start.qwen3,
            tokenizer_dir=self.start.tokenizer_dir,
            optimizer_format=self.config.checkpoint.optimizer_format,
            trainer_state={
                "step": self.step,
                "nonfinite_steps": self.nonfinite_steps,
                "scheduler": self.scheduler.state_dict(),
                "optimizer_updates": self.scheduler.num_steps,  # successful updates == Adam's step
                "data": self.data.state_dict(),
                "loss": self.config.loss,
                "teacher_nonfinite_steps": self.teacher_nonfinite_steps,
                # What this checkpoint was trained with: a resume compares against it (run_dir.py).
                "config": self.config.to_dict(),
                "inputs": self.checks.inputs,
            },
            start_fingerprint=self.start.fingerprint,
            keep_last=self.config.checkpoint.keep_last,
        )

    def close(self) -> None:
        for thing in (self.data, *self.callbacks):
            if thing is not None:
                thing.close()
        if self.lock is not None:
            self.lock.release()


def megatron_optimizer_config(config: TrainConfig, precision: str):
    """megatron-core's OptimizerConfig for our config (Adam; the MoE run's memory options)."""
    from megatron.core.optimizer import OptimizerConfig

    o, bf16 = config.optimizer, precision == "bf16"
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        optimizer_cpu_offload=o.cpu_offload,
        optimizer_offload_fraction=o.cpu_offload_fraction if o.cpu_offload else 0.0,
        overlap_cpu_optimizer_d2h_h2d=o.cpu_offload and o.overlap_cpu_offload,
        use_precision_aware_optimizer=o.precision_aware,
    )


def train(config: TrainConfig, data=None) -> RunSummary:
    """Run (or resume) a training run. Call in every process of the launch (torchrun, srun, or one).
    `data`: a `DataProvider` other than the config's store / SFT data (the demo's online OPD)."""
    from megatron_lopd.runtime import destroy_distributed
    from megatron_lopd.runtime.lifetime import children_die_with_parent

    trainer = Trainer(config, data)
    restore_handlers = trainer.install_stop_handlers()
    # The checkpoint writer's processes (dist_checkpointing's manager and writers) die with us.
    with children_die_with_parent():
        try:
            trainer.setup()
            summary = trainer.run()
        finally:
            restore_handlers()
            trainer.close()
            destroy_distributed()
    check_teacher_scores(config, summary)
    return summary


def check_teacher_scores(config: TrainConfig, summary: RunSummary) -> None:
    """Bad input found late: steps skipped for NaN/inf teacher log-probs. The run finished
    (checkpoint and export written), but it must not pass as clean: the command exits non-zero."""
    if summary.teacher_nonfinite_steps:
        raise ArtifactError(
            f"{config.data.store}: {summary.teacher_nonfinite_steps} training steps had NaN/inf teacher log-probs and were "
            f"skipped (see the WARNING lines and metrics.jsonl 'teacher_nonfinite'); run {config.run_dir} finished otherwise",
            f"run `lopd store verify {config.data.store}` and rescore the damaged shards, then train again")
