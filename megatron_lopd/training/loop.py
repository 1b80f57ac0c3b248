"""The training loop on megatron-core: `train(config) -> RunSummary`.

One loop for SFT and Lightning OPD (and the top-k losses): the loss name picks the data
(SFT artifact or teacher store) and the loss function; everything else is shared.

Per step: the data layer hands this DP rank its share of the global batch as packed
micro-batches; `get_forward_backward_func()` runs them through the pipeline schedule;
the loss contributions are already globally normalised (mean over each sequence's
response tokens, then over the global batch), so Megatron is told not to rescale them
(`calculate_per_token_loss=True` with a token count of 0: no division by the number of
micro-batches, DP gradients summed instead of averaged). Metric sums are all-reduced
once per step. A step whose loss or gradient is NaN/inf is skipped (no update) and
counted; `max_consecutive_nonfinite` in a row stop the run with a clear message.

Everything that can be checked is checked before the first forward: the parallel layout
against the model, the data against the model's context and vocabulary, the teacher
consistency of store, SFT data and starting checkpoint, FP8/TE availability.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError, LopdError
from megatron_lopd.training.config import TrainConfig

log = logging.getLogger("megatron_lopd.train")

# Metric sums from the loss (losses.token_metrics) -> the per-step mean logged under this name.
_MEANS = {
    "kl_to_teacher": "kl_to_teacher_sum",
    "reverse_kl": "reverse_kl_sum",
    "top1_agreement": "top1_agree_sum",
    "drift_chi2": "drift_chi2_sum",
    "drift_kl": "drift_kl_sum",
    "entropy": "entropy_sum",
}
_SUM_KEYS = ("loss", "tokens", "sequences", "teacher_nonfinite", *_MEANS.values())


class TrainingStopped(LopdError):
    """Training cannot continue (too many non-finite steps in a row)."""

    all_ranks = True


class TrainingInterrupted(LopdError):
    """A stop signal arrived; a checkpoint was written and the run can be resumed."""

    all_ranks = True

    def __init__(self, what: str, fix: str, exit_code: int):
        super().__init__(what, fix)
        self.exit_code = exit_code


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


@dataclass
class StartModel:
    """Where the student's weights come from, and its provenance."""

    kind: str  # "hf" | "megatron" | "named"
    path: Path | None
    qwen3: Any  # models.qwen3.Qwen3Config
    tokenizer_dir: Path | None
    fingerprint: str | None
    tokenizer_fingerprint: str | None


def resolve_start_model(config: TrainConfig) -> StartModel:
    from megatron_lopd.models.qwen3 import Qwen3Config, named_config
    from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint

    if config.model.named:
        return StartModel("named", None, named_config(config.model.named), None, None, None)
    path = Path(config.model.start_from)
    if not path.is_dir():
        raise ArtifactError(f"{path}: model.start_from does not exist", "pass a Hugging Face dir or a Megatron checkpoint dir")
    from megatron_lopd.models.checkpoint import METADATA_FILE, read_checkpoint_metadata

    if (path / METADATA_FILE).is_file():  # a Megatron checkpoint (converted or trained)
        meta = read_checkpoint_metadata(path)
        tok = path / "tokenizer"
        # Converted from HF: the source's fingerprint. Trained here: that of its HF export.
        fingerprint = (meta.get("source") or {}).get("model_fingerprint") or meta.get("hf_fingerprint")
        return StartModel(
            "megatron",
            path,
            Qwen3Config.from_hf(meta["hf_config"]),
            tok if tok.is_dir() else None,
            fingerprint,
            tokenizer_fingerprint(tok) if tok.is_dir() else None,
        )
    if (path / "config.json").is_file():
        return StartModel("hf", path, Qwen3Config.from_hf(path), path, model_fingerprint(path), tokenizer_fingerprint(path))
    raise ArtifactError(
        f"{path}: neither a Hugging Face model (config.json) nor a Megatron checkpoint ({METADATA_FILE})",
        "point model.start_from at a HF dir or at the output of `lopd convert from-hf`",
    )


def open_data_source(config: TrainConfig):
    from megatron_lopd.training.data import ArtifactSource, StoreSource

    if config.loss == "sft":
        return ArtifactSource.open(config.data.sft_data)
    needs_topk = config.loss.startswith("topk_")
    source = StoreSource.open(config.data.store, load_topk=needs_topk or config.logging.top1_agreement)
    if needs_topk and not source.top_k:
        raise ArtifactError(
            f"{config.data.store}: the store holds no teacher top-k, which loss {config.loss!r} needs",
            "rescore with `lopd score --top-k K`, or use loss=lightning_opd",
        )
    return source


def check_consistency(config: TrainConfig, start: StartModel, source) -> tuple[list[str], dict[str, Any]]:
    """DESIGN section 4. Returns (opted-out violations, provenance record for the run's metadata)."""
    from megatron_lopd.provenance import ConsistencyOptOut, check_teacher_consistency

    tc = config.teacher_consistency
    opt_out = ConsistencyOptOut(allow_inconsistent_teacher=tc.allow_inconsistent_teacher, allow_policy_mismatch=tc.allow_policy_mismatch)
    tokenizers = {"student": start.tokenizer_fingerprint}
    record: dict[str, Any] = {"start_from": str(start.path) if start.path else config.model.named, "start_fingerprint": start.fingerprint}
    if config.loss == "sft":
        art = source.artifact
        tokenizers["sft_data"] = art.tokenizer_fingerprint
        record.update(sft_data=str(source.path), sft_data_fingerprint=art.fingerprint, sft_data_generator=art.generator_fingerprint)
        return check_teacher_consistency(
            store_teacher="", sft_data_generator=None, rollout_policy=None, start_checkpoint=None, tokenizers=tokenizers, opt_out=opt_out
        ), record
    prov = source.provenance
    teacher, rollout_policy = prov.teacher_fingerprint, prov.rollout_generator_fingerprint or None
    tokenizers["store"] = prov.tokenizer_fingerprint
    sft_generator = tc.sft_data_generator or None
    if config.data.sft_data:
        from megatron_lopd.artifacts import RolloutArtifact

        art = RolloutArtifact.open(config.data.sft_data)
        sft_generator = art.generator_fingerprint
        tokenizers["sft_data"] = art.tokenizer_fingerprint
        record["sft_data_fingerprint"] = art.fingerprint
    record.update(
        store=str(source.path),
        store_finalized_at=source.store.meta.finalized_at,  # which scoring of the rollouts (a rescore changes it)
        teacher_fingerprint=teacher,
        store_tokenizer=prov.tokenizer_fingerprint,
        rollouts_fingerprint=prov.rollouts_fingerprint,
        rollout_policy=rollout_policy,
        sft_data_generator=sft_generator,
    )
    warnings: list[str] = []
    if sft_generator is None:
        what = "teacher consistency cannot be verified: the SFT data's generator is unknown"
        if not tc.allow_inconsistent_teacher:
            raise ConsistencyError(
                what,
                "pass data.sft_data=DIR (the SFT artifact) or teacher_consistency.sft_data_generator=FINGERPRINT, "
                "or set teacher_consistency.allow_inconsistent_teacher=true for an ablation",
            )
        warnings.append(what)
    start_fp = start.fingerprint
    if start.kind == "named":
        start_fp = None
        if not tc.allow_policy_mismatch:
            raise ConsistencyError(
                "a random-weight model (model.named) cannot be the policy that sampled the rollouts",
                "start from the checkpoint that generated the rollouts, or set teacher_consistency.allow_policy_mismatch=true",
            )
    elif start_fp is None:
        what = f"{start.path}: the checkpoint records no source fingerprint, so the rollout policy cannot be checked"
        if not tc.allow_policy_mismatch:
            raise ConsistencyError(what, "start from the HF dir the rollouts were sampled with, or convert it with `lopd convert from-hf`")
        warnings.append(what)
    warnings += check_teacher_consistency(
        store_teacher=teacher,
        sft_data_generator=sft_generator,
        rollout_policy=rollout_policy,
        start_checkpoint=start_fp,
        tokenizers=tokenizers,
        opt_out=opt_out,
    )
    return warnings, record


@torch.no_grad()
def vocab_parallel_top1(logits: torch.Tensor, tp_group, vocab_size: int) -> torch.Tensor:
    """The student's argmax id [B, T] over vocab-parallel logits [B, T, V/TP] (lowest id on ties).

    One max pass and two small all-reduces: the top-1 agreement metric of Lightning OPD
    without the top-k loss machinery (which costs an extra normalisation over the vocabulary).
    Columns past `vocab_size` (Megatron's vocabulary padding) never win.
    """
    local = logits.shape[-1]
    rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    start = rank * local
    valid = max(0, min(local, vocab_size - start))
    if valid:
        values, ids = logits[..., :valid].max(-1)
        values = values.float()
    else:  # this rank holds only padding columns
        values = torch.full(logits.shape[:-1], -math.inf, device=logits.device)
        ids = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if tp_group is None:
        return ids
    best = values.clone()
    torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    winner = torch.where(values == best, ids + start, torch.full_like(ids, torch.iinfo(torch.long).max))
    torch.distributed.all_reduce(winner, op=torch.distributed.ReduceOp.MIN, group=tp_group)
    return winner


def _check_features(config: TrainConfig) -> None:
    """GPU-only features requested where they cannot run: a clear error before anything starts."""
    from megatron_lopd.models.qwen3 import te_available

    needs = [w for w, on in (("FP8", bool(config.model.fp8)), ("sequence parallel", config.parallel.sequence_parallel)) if on]
    if config.model.use_te == "true":
        needs.append("model.use_te=true")
    if needs and not te_available():
        raise ConfigError(
            f"{' and '.join(needs)} requested, but Transformer Engine is not usable here "
            f"({'no CUDA device' if not torch.cuda.is_available() else 'transformer_engine does not import'})",
            "run on a GPU node with transformer-engine installed (pip install 'megatron-lopd[te]'), "
            "or set model.fp8= parallel.sequence_parallel=false model.use_te=auto",
        )
    if config.logging.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.wandb_project is set but wandb is not installed", "pip install wandb, or unset logging.wandb_project") from None
    if config.parallel.context_parallel != 1:
        raise ConfigError("context parallel is not supported by the trainer", "set parallel.context_parallel=1")


def _precision(config: TrainConfig) -> str:
    if config.model.precision != "auto":
        return config.model.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


class Trainer:
    """Holds the pieces of one run; `train()` is the public entry."""

    def __init__(self, config: TrainConfig):
        self.config = config.validate()
        self.run_dir = Path(config.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.logger = None
        self.data = None
        self.lock = None  # rank 0: the run dir's OutputLock
        self.resumes: list[dict[str, Any]] = []
        self.stop_signal: int | None = None  # set by SIGTERM / SIGUSR1 (install_stop_handlers)
        self.agreed_stop_signal = 0  # the largest stop signal any rank got, known to all after each step

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from megatron_lopd.runtime import device, init_distributed

        cfg = self.config
        _check_features(cfg)
        self.info = init_distributed(cfg.parallel.runtime(), seed=cfg.seed)
        self.device = device()
        self.rank = torch.distributed.get_rank()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.is_logging_rank = self.rank == 0
        self.precision = _precision(cfg)

        # The run dir, provenance, bad input and the resume's settings: rank 0 checks, every
        # rank raises the same error.
        (self.start, self.source, self.consistency_warnings, self.provenance, self.resume_from,
         self.resume_changes) = self._on_rank0_then_share(self._preflight)
        q = self.start.qwen3
        from megatron_lopd.models.qwen3 import check_parallel_layout

        check_parallel_layout(q, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.expert_parallel, where=str(self.start.path or q))
        if cfg.data.seq_length > q.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length={cfg.data.seq_length} is longer than the model's context ({q.max_position_embeddings} positions)",
                f"set data.seq_length <= {q.max_position_embeddings}",
            )
        if self.source.vocab_size and self.source.vocab_size > q.vocab_size:
            raise ArtifactError(
                f"{self.source.path}: was scored with a vocabulary of {self.source.vocab_size} ids, the student has {q.vocab_size}",
                "score the rollouts with a teacher that shares the student's tokenizer and vocabulary",
            )
        if cfg.data.global_batch % self.dp_size:
            raise ConfigError(
                f"data.global_batch={cfg.data.global_batch} is not divisible by the data-parallel size {self.dp_size}",
                "set data.global_batch to a multiple of the data-parallel size (world size / (TP x PP))",
            )
        self._build_model()
        self.build_data()
        self.total_steps = self._total_steps()
        self._build_optimizer()
        self.step, self.nonfinite_steps, self.teacher_nonfinite_steps = 0, 0, 0
        if self.resume_from is not None:
            self._resume()
        elif self.is_logging_rank:
            from megatron_lopd.training.metrics_log import truncate_metrics

            truncate_metrics(self.run_dir, 0)  # an attempt killed before its first checkpoint
        # A finished run asked again with the same settings: nothing to train, nothing to rewrite.
        self.already_complete = self.step >= self.total_steps and self._recorded_extra().get("status") == "complete"
        if not self.already_complete:
            self._start_logging()

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
            cls = {c.__name__: c for c in (ArtifactError, ConfigError, ConsistencyError)}.get(kind, LopdError)
            exc = cls(what, fix)
            exc.all_ranks = True  # the CLI prints it on rank 0 only
            raise exc
        # The start model's description travels (no re-hashing of a large checkpoint on every
        # rank); every rank opens the data itself (the checks already passed on rank 0).
        box = [(result[0], *result[2:]) if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        start, *rest = box[0]
        source = result[1] if self.rank == 0 else open_data_source(self.config)
        return (start, source, *rest)

    def _preflight(self):
        """Rank 0, before any compute: the run dir is ours and not in use (locked for the run),
        the inputs pass `check_inputs`, and a resume asks for nothing its checkpoint forbids.
        Returns (start, source, warnings, provenance record, resume checkpoint, resume changes)."""
        from megatron_lopd.runtime.files import LOCK_NAME, OutputLock, check_writable_dir
        from megatron_lopd.store import check_store_files
        from megatron_lopd.training.checkpointing import read_metadata
        from megatron_lopd.training.data import StoreSource
        from megatron_lopd.training.run_dir import check_run_dir, resume_changes

        check_run_dir(self.config)
        check_writable_dir(self.run_dir, "run_dir")
        self.lock = OutputLock(self.run_dir / LOCK_NAME, "run dir").acquire()
        start, source, warnings, record = self.check_inputs()
        if isinstance(source, StoreSource):  # a damaged shard fails here in a second, not hours into the run
            check_store_files(source.path)
        resume_from = self._find_resume()
        changes = {}
        if resume_from is not None:
            changes = resume_changes(resume_from, read_metadata(resume_from).get("trainer", {}), self.config, record)
        return start, source, warnings, record, resume_from, changes

    def _recorded_extra(self) -> dict[str, Any]:
        """`extra` of the run dir's manifest.json as a previous invocation left it ({} if none)."""
        from megatron_lopd.provenance import MANIFEST_NAME

        try:
            extra = json.loads((self.run_dir / MANIFEST_NAME).read_text())["extra"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return extra if isinstance(extra, dict) else {}

    # The two data extension points: a subclass that feeds another data stream overrides both
    # (demo/online.py: standard online OPD with a live sampler and teacher).
    def check_inputs(self):
        """On rank 0, before any compute: (start model, data source, consistency warnings,
        provenance record). Raise a LopdError for bad input; every rank raises it."""
        start = resolve_start_model(self.config)
        source = open_data_source(self.config)
        warnings, record = check_consistency(self.config, start, source)
        return start, source, warnings, record

    def _find_resume(self) -> Path | None:
        from megatron_lopd.training.checkpointing import find_latest

        resume = self.config.checkpoint.resume
        if resume == "none":
            if (self.run_dir / "metrics.jsonl").exists() or find_latest(self.ckpt_root) is not None:
                raise ConfigError(
                    f"{self.run_dir}: already holds a run and checkpoint.resume=none",
                    "resume it (checkpoint.resume=auto), or choose a new run_dir",
                )
            return None
        if resume == "auto":
            return find_latest(self.ckpt_root)
        path = Path(resume)
        if not path.is_dir():
            raise ArtifactError(f"{path}: checkpoint.resume does not exist", "pass a checkpoint dir, auto or none")
        return path

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
        if self.resume_from is None and self.start.kind != "named":
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

    def build_data(self) -> None:
        """Set `self.data`: what `run` iterates (the model exists; `self.source` is opened)."""
        from megatron_lopd.training.data import TrainData

        cfg, d = self.config, self.config.data
        pp = cfg.parallel.pipeline_parallel
        pack_on_te = self.use_te and d.pack
        if pack_on_te and d.micro_batch_size != 1:
            raise ConfigError("packed sequences on Transformer Engine need data.micro_batch_size=1", "set data.micro_batch_size=1 (raise seq_length instead)")
        # Top-k losses read the teacher's top-k; otherwise only its top-1 id, for the agreement metric.
        top_k = self.source.top_k if cfg.loss.startswith("topk_") else 0
        with_top1 = not top_k and bool(self.source.top_k) and cfg.logging.top1_agreement
        # Sequence parallel splits the token dimension across TP ranks; FP8 GEMMs need
        # multiples of 16 tokens. Trimmed rows are padded to that; untrimmed rows are seq_length.
        multiple = d.pad_to_multiple
        if cfg.parallel.sequence_parallel:
            multiple = math.lcm(multiple, self.tp_size)
        if cfg.model.fp8:
            multiple = math.lcm(multiple, 16)
        if d.seq_length % multiple and (cfg.parallel.sequence_parallel or cfg.model.fp8):
            raise ConfigError(
                f"data.seq_length={d.seq_length} must be a multiple of {multiple} with sequence parallel / FP8",
                f"set data.seq_length to a multiple of {multiple}",
            )
        self.data = TrainData(
            self.source,
            global_batch=d.global_batch,
            seq_length=d.seq_length,
            micro_batch_size=d.micro_batch_size,
            seed=d.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            shuffle=d.shuffle,
            pack=d.pack,
            trim_padding=d.trim_padding and pp == 1,  # pipeline stages exchange fixed shapes
            pad_to_multiple=multiple,
            with_teacher=cfg.loss != "sft",
            top_k=top_k,
            with_top1=with_top1,
            with_rollout=cfg.loss != "sft" and self.source.has_rollout_logprobs,
            vocab_size=self.start.qwen3.vocab_size,
            pad_id=self.start.qwen3.pad_token_id if isinstance(self.start.qwen3.pad_token_id, int) else 0,
            prefetch=d.prefetch,
        )

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.epochs > 0:
            return max(1, math.ceil(cfg.epochs * len(self.data) / cfg.data.global_batch))
        return cfg.train_steps

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg, o, s = self.config, self.config.optimizer, self.config.schedule
        bf16 = self.precision == "bf16"
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
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
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            ),
            [self.model],
        )
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

        state = checkpointing.load_training_checkpoint(self.resume_from, model=self.model.module, optimizer=self.optimizer)
        if state.get("loss") != self.config.loss:
            raise ConfigError(
                f"{self.resume_from}: was trained with loss {state.get('loss')!r}, this run uses {self.config.loss!r}",
                "resume with the same loss, or start a new run_dir with model.start_from=" + str(self.resume_from),
            )
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.teacher_nonfinite_steps = int(state.get("teacher_nonfinite_steps", 0))
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        if self.resume_changes:
            from megatron_lopd.training.run_dir import apply_optimizer_changes

            apply_optimizer_changes(self.resume_changes, self.optimizer, self.scheduler)
        if self.is_logging_rank:
            truncate_metrics(self.run_dir, self.step)
        torch.distributed.barrier()

    def _start_logging(self) -> None:
        from megatron_lopd.training.metrics_log import MetricsLogger

        cfg = self.config
        lg = cfg.logging
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.is_logging_rank,
            total_steps=self.total_steps,
            log_every=lg.log_every,
            tensorboard=lg.tensorboard,
            wandb_project=lg.wandb_project,
            wandb_entity=lg.wandb_entity,
            wandb_run_name=lg.wandb_run_name,
            run_config=cfg.to_dict(),
            progress=lg.progress,
            start_step=self.step,
        )
        if self.is_logging_rank:
            from megatron_lopd.runtime.files import atomic_write

            atomic_write(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            self.resumes = self._recorded_resumes()
            if self.resume_from is not None:
                self.resumes.append({"step": self.step, "checkpoint": str(self.resume_from), "changes": self.resume_changes})
                for key, (old, new) in self.resume_changes.items():
                    self.logger.console(f"resume: {key} {old!r} -> {new!r} (from step {self.step + 1}; recorded in manifest.json)")
            self._write_manifest(status="running")
            for w in self.consistency_warnings:
                banner = "!" * 100
                self.logger.console(f"{banner}\nRESEARCH OPT-OUT: {w}\n(recorded in {self.run_dir / 'manifest.json'})\n{banner}")
                log.warning("teacher-consistency opt-out: %s", w)
            q = self.start.qwen3
            where = f"resumed from {self.resume_from} at step {self.step}" if self.resume_from else f"from {self.start.path or cfg.model.named}"
            self.logger.console(
                f"lopd train: loss={cfg.loss}, {q.num_params() / 1e6:.1f}M params, {self.precision}"
                f"{', fp8 ' + cfg.model.fp8 if cfg.model.fp8 else ''}, TP={self.tp_size} PP={cfg.parallel.pipeline_parallel} "
                f"DP={self.dp_size}, {len(self.data)} sequences, global batch {cfg.data.global_batch}, "
                f"{self.total_steps} steps, {where}"
            )
        from megatron_lopd.training.metrics_log import peak_tflops

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak_tflops = peak_tflops(name, "fp8" if cfg.model.fp8 else "bf16", lg.peak_tflops) if torch.cuda.is_available() else None

    def _recorded_resumes(self) -> list[dict[str, Any]]:
        """The resume history of the run up to its checkpoint (settings changed at each resume)."""
        if self.resume_from is None:
            return []
        resumes = self._recorded_extra().get("resumes")
        return [r for r in resumes if isinstance(r, dict) and r.get("step", 0) < self.step] if isinstance(resumes, list) else []

    def _write_manifest(self, *, status: str, **extra) -> None:
        from megatron_lopd.provenance import Manifest

        tc = self.config.teacher_consistency
        Manifest(
            kind="run",
            producer={"trainer": "megatron_lopd.training.loop", "loss": self.config.loss},
            inputs=self.provenance,
            params=self.config.to_dict(),
            extra={
                "status": status,
                "layout": {"tensor_parallel": self.tp_size, "pipeline_parallel": self.config.parallel.pipeline_parallel, "data_parallel": self.dp_size},
                "precision": self.precision,
                "consistency_opt_out": {"allow_inconsistent_teacher": tc.allow_inconsistent_teacher, "allow_policy_mismatch": tc.allow_policy_mismatch},
                "consistency_warnings": self.consistency_warnings,
                "resumes": self.resumes,
                **extra,
            },
        ).write(self.run_dir)

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        from megatron_lopd.training.data import block_causal_mask, packed_seq_params
        from megatron_lopd.training.losses import LossOptions, compute_loss

        mb = next(data_iterator).to(self.device, non_blocking=True)
        attention_mask = packed = None
        if self.config.data.pack:
            if self.use_te:
                packed = packed_seq_params(mb.seq_ids)
            else:
                attention_mask = block_causal_mask(mb.seq_ids)
        logits = model(mb.input_ids, mb.position_ids, attention_mask, packed_seq_params=packed)
        options = LossOptions(advantage_clip=self.config.advantage_clip or None, reduction=self.config.loss_reduction,
                              vocab_size=self.start.qwen3.vocab_size)
        zero_tokens = torch.zeros([], dtype=torch.int, device=self.device)

        def loss_func(output):
            loss, sums = compute_loss(self.config.loss, output, mb.loss_inputs(), tp_group=self.tp_group, options=options)
            sums = {k: v.detach() for k, v in sums.items()}
            if mb.teacher_top1_ids is not None:
                top1 = vocab_parallel_top1(output, self.tp_group, self.start.qwen3.vocab_size)
                sums["top1_agree_sum"] = ((top1 == mb.teacher_top1_ids) & mb.loss_mask.bool()).sum(dtype=torch.float32)
            sums["loss"] = loss.detach().float()
            return loss, zero_tokens, sums

        return logits, loss_func

    def _reduce(self, per_microbatch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum the metric sums over micro-batches and DP ranks (one all-reduce for all of them)."""
        from megatron.core import parallel_state as ps

        vec = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=self.device)
        present = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=self.device)
        if self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
            for sums in per_microbatch:
                for i, key in enumerate(_SUM_KEYS):
                    if key in sums:
                        vec[i] += sums[key].double()
                        present[i] = 1
        both = torch.stack([vec, present])
        torch.distributed.all_reduce(both)
        vec, present = both[0].tolist(), both[1].tolist()
        return {k: v for k, v, p in zip(_SUM_KEYS, vec, present) if p > 0}

    def train_step(self, batch) -> dict[str, Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t0 = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(batch.micro_batches),
            model=[self.model],
            num_microbatches=len(batch.micro_batches),
            seq_length=batch.row_length,
            micro_batch_size=self.config.data.micro_batch_size,
            forward_only=False,
        )
        sums = self._reduce(outputs)
        bad_teacher = int(sums.get("teacher_nonfinite", 0))
        if bad_teacher and self.logger is not None:
            self.logger.console(
                f"WARNING: {self.source.path}: {bad_teacher} response tokens of step {self.step + 1} have NaN/inf teacher "
                f"log-probs (the step's sequences: {sorted(batch.global_indices.tolist())}); the step is skipped. "
                "Check the store with `lopd store verify` and rescore the damaged sequences."
            )
        loss = sums.get("loss", float("nan"))
        finite = math.isfinite(loss)
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = finite and math.isfinite(grad_norm)
        lr = None
        if finite:
            self.scheduler.step(1)  # the lr of this update (see _build_optimizer)
            lr = self._current_lr()
            ok, _, _ = self.optimizer.step()
            finite = bool(ok)
        # Every rank measures its own time (data wait included); the slowest defines the step.
        # The same all-reduce tells every rank whether any of them got a stop signal, so all
        # of them checkpoint after this step together.
        agreed = torch.tensor([time.perf_counter() - t0 + batch.wait_s, float(self.stop_signal or 0)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        step_time, self.agreed_stop_signal = float(agreed[0].item()), int(agreed[1].item())
        tokens = self._global_tokens(batch)
        tokens_per_s = tokens / step_time if step_time > 0 else 0.0
        n_tok = sums.get("tokens", 0.0)
        record: dict[str, Any] = {
            "step": self.step + 1,
            "loss": loss,
            **{name: (sums[key] / n_tok if key in sums and n_tok > 0 else None) for name, key in _MEANS.items()},
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "loss_tokens": int(n_tok),
            "sequences": self.config.data.global_batch,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "mfu": self._mfu(tokens_per_s, batch.row_length),
            "skipped": not finite,
            "teacher_nonfinite": bad_teacher,
        }
        return record

    def _global_tokens(self, batch) -> int:
        t = torch.tensor([batch.tokens], dtype=torch.float64, device=self.device)
        from megatron.core import parallel_state as ps

        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
        return int(t.item())

    def _current_lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(groups[0]["lr"]) if groups else self.config.optimizer.lr

    def _mfu(self, tokens_per_s: float, row_length: int) -> float | None:
        from megatron_lopd.training.metrics_log import mfu

        if self.peak_tflops is None:
            return None
        flops = self.start.qwen3.flops_per_token(row_length)
        return mfu(tokens_per_s, flops, torch.distributed.get_world_size(), self.peak_tflops)

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunSummary:
        from megatron_lopd.training import checkpointing

        cfg = self.config
        summary = RunSummary(self.run_dir, self.step, {}, resumed_from=self.resume_from, consistency_warnings=self.consistency_warnings)
        if self.already_complete:
            summary.final_checkpoint = checkpointing.find_latest(self.ckpt_root)
            summary.nonfinite_steps, summary.teacher_nonfinite_steps = self.nonfinite_steps, self.teacher_nonfinite_steps
            if self.is_logging_rank:
                print(f"lopd train: {self.run_dir} is complete at step {self.step} (train_steps {self.total_steps}); "
                      "nothing to train (raise train_steps to extend it)", flush=True)
            return summary
        consecutive = 0
        while self.step < self.total_steps:
            t_wait = time.perf_counter()
            batch = self.data.next_step()
            batch.wait_s = time.perf_counter() - t_wait
            record = self.train_step(batch)
            self.step += 1
            if record["skipped"]:
                self.nonfinite_steps += 1
                self.teacher_nonfinite_steps += bool(record["teacher_nonfinite"])
                consecutive += 1
            else:
                consecutive = 0
            record["nonfinite_steps"] = self.nonfinite_steps
            record["consumed_sequences"] = self.data.consumed
            record["epoch"] = self.data.consumed / len(self.data)
            self.logger.log(record)
            summary.records.append(record)
            summary.losses[self.step] = record["loss"]
            if consecutive >= cfg.max_consecutive_nonfinite:
                raise TrainingStopped(
                    f"training stopped at step {self.step}: {consecutive} steps in a row had a NaN/inf loss or gradient "
                    f"({self.nonfinite_steps} skipped in total)",
                    (f"the teacher store has NaN/inf log-probs ({self.source.path}): run `lopd store verify` and rescore; "
                     if record["teacher_nonfinite"] else "lower optimizer.lr, check the data, ")
                    + f"or resume from the last good checkpoint in {self.ckpt_root}",
                )
            last = self.step == self.total_steps
            if last or self.agreed_stop_signal or (cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0):
                summary.final_checkpoint = self.save_checkpoint()
            if self.agreed_stop_signal and not last:
                self._stop_on_signal(summary.final_checkpoint)
        summary.last_step = self.step
        summary.nonfinite_steps, summary.teacher_nonfinite_steps = self.nonfinite_steps, self.teacher_nonfinite_steps
        timed = [r for r in summary.records[1:] or summary.records]  # the first step includes warm-up
        if timed:
            summary.mean_step_time_s = sum(r["step_time_s"] for r in timed) / len(timed)
            summary.mean_tokens_per_s = sum(r["tokens"] for r in timed) / max(sum(r["step_time_s"] for r in timed), 1e-9)
        if summary.final_checkpoint is None:
            summary.final_checkpoint = checkpointing.find_latest(self.ckpt_root)
        if cfg.checkpoint.export_hf:
            summary.hf_export = self.export_hf()
        if self.is_logging_rank:
            self._write_manifest(
                status="complete",
                final_step=self.step,
                final_checkpoint=str(summary.final_checkpoint) if summary.final_checkpoint else None,
                hf_export=str(summary.hf_export) if summary.hf_export else None,
                hf_fingerprint=self.hf_fingerprint if summary.hf_export else None,
                nonfinite_steps=self.nonfinite_steps,
                teacher_nonfinite_steps=self.teacher_nonfinite_steps,
            )
        return summary

    def _stop_on_signal(self, checkpoint: Path) -> None:
        """After the checkpoint of this step: record the interruption and leave (every rank)."""
        name = signal.Signals(self.agreed_stop_signal).name
        if self.is_logging_rank:
            self._write_manifest(status="interrupted", final_step=self.step, final_checkpoint=str(checkpoint), stop_signal=name)
        raise TrainingInterrupted(
            f"training stopped by {name} at step {self.step} of {self.total_steps}: checkpoint {checkpoint} written",
            "rerun the same command to resume (slurm/lightning_opd_8b.sh requeues its job itself)",
            exit_code=128 + self.agreed_stop_signal)

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
                "inputs": self.provenance,
            },
            start_fingerprint=self.start.fingerprint,
            keep_last=self.config.checkpoint.keep_last,
        )

    def export_hf(self) -> Path:
        from megatron_lopd.models import checkpoint as mckpt
        from megatron_lopd.provenance import model_fingerprint

        out = self.run_dir / "hf"
        if self.is_logging_rank and out.exists():
            shutil.rmtree(out)
        torch.distributed.barrier()
        mckpt.export_model_to_hf(self.inner_model, self.start.qwen3, self.start.tokenizer_dir, out)
        torch.distributed.barrier()
        self.hf_fingerprint = model_fingerprint(out) if self.is_logging_rank else None
        if self.is_logging_rank:
            from megatron_lopd.training.checkpointing import record_hf_export

            latest = self._latest()
            if latest is not None:
                record_hf_export(latest, out, self.hf_fingerprint)
            self.logger.console(f"exported the final model to {out} ({self.hf_fingerprint})")
        return out

    def _latest(self) -> Path | None:
        from megatron_lopd.training.checkpointing import find_latest

        return find_latest(self.ckpt_root)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()


def train(config: TrainConfig) -> RunSummary:
    """Run (or resume) a training run. Call in every process of the launch (torchrun, srun, or one)."""
    from megatron_lopd.runtime import destroy_distributed
    from megatron_lopd.runtime.lifetime import children_die_with_parent

    trainer = Trainer(config)
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
