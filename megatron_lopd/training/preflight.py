"""Every check before compute, in one place: `preflight(config, data, world_size)`.

The trainer runs it on rank 0 before the model is built; `lopd pipeline check-train` runs the
same function before a job is queued (no GPU needed), so both refuse the same things:

- the run dir is ours and none of the run's inputs (`run_dir.check_run_dir`);
- the start model exists and describes itself (HF dir, Megatron checkpoint, or a named shape);
- the data opens and matches the loss (`DataProvider.open`: store or SFT artifact, top-k when
  the loss needs it; a damaged shard fails here in a second, not hours into the run);
- the inputs' lineage is consistent (`provenance.Lineage`: the paper's consistent teacher);
- the layout fits the model and the world (TP/PP/EP, sequence length, vocabulary, DP batch);
- a resume asks for nothing its checkpoint forbids (`run_dir.resume_changes`).

What depends on the machine the job runs on (Transformer Engine, CUDA, wandb) is
`check_environment`, called by the trainer only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.provenance import ConsistencyOptOut
from megatron_lopd.training.config import TrainConfig


@dataclass
class StartModel:
    """Where the student's weights come from, and its provenance."""

    kind: str  # "hf" | "megatron" | "named"
    path: Path | None
    qwen3: Any  # models.qwen3.Qwen3Config
    tokenizer_dir: Path | None
    fingerprint: str | None
    tokenizer_fingerprint: str | None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"model.named={self.qwen3}"


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
        return StartModel("megatron", path, Qwen3Config.from_hf(meta["hf_config"]), tok if tok.is_dir() else None,
                          fingerprint, tokenizer_fingerprint(tok) if tok.is_dir() else None)
    if (path / "config.json").is_file():
        return StartModel("hf", path, Qwen3Config.from_hf(path), path, model_fingerprint(path), tokenizer_fingerprint(path))
    raise ArtifactError(
        f"{path}: neither a Hugging Face model (config.json) nor a Megatron checkpoint ({METADATA_FILE})",
        "point model.start_from at a HF dir or at the output of `lopd convert from-hf`",
    )


def row_multiple(config: TrainConfig) -> int:
    """Rows are padded (or trimmed) to a multiple of this, for every layout:

    - sequence parallel splits each row's tokens evenly over the TP ranks: TP divides it;
    - FP8 GEMMs (TE) need token counts that are multiples of 16; with sequence parallel TE checks
      each rank's local tokens (row / TP), before the all-gather, for multiples of 8.
    So FP8 + SP at TP 4 needs rows of 32k tokens, at TP 8 of 64k (16 alone failed half and
    three quarters of the row lengths). Untrimmed rows are seq_length: it must be a multiple."""
    tp, sp, fp8 = config.parallel.tensor_parallel, config.parallel.sequence_parallel, bool(config.model.fp8)
    multiple = math.lcm(config.data.pad_to_multiple, tp if sp else 1, 16 if fp8 else 1, 8 * tp if sp and fp8 else 1)
    if config.data.seq_length % multiple and (sp or fp8):
        raise ConfigError(f"data.seq_length={config.data.seq_length} must be a multiple of {multiple} with sequence parallel / FP8 at TP {tp}",
                          f"set data.seq_length to a multiple of {multiple}")
    return multiple


def check_layout(config: TrainConfig, start: StartModel, source, world_size: int | None) -> int | None:
    """The layout against the model, the data and (when known) the world. Returns DP size or None."""
    from megatron_lopd.models.qwen3 import check_parallel_layout

    q, par = start.qwen3, config.parallel
    check_parallel_layout(q, par.tensor_parallel, par.pipeline_parallel, par.expert_parallel, etp=par.expert_tensor_parallel, where=start.where)
    if q.is_moe and par.expert_parallel > 1 and par.tensor_parallel > 1 and not par.sequence_parallel:
        raise ConfigError(f"{start.where}: expert parallel with tensor parallel needs sequence parallel (megatron-core's MoE layers)",
                          "set parallel.sequence_parallel=true")
    if config.data.seq_length > q.max_position_embeddings:
        raise ConfigError(f"data.seq_length={config.data.seq_length} is longer than the model's context ({q.max_position_embeddings} positions)",
                          f"set data.seq_length <= {q.max_position_embeddings}")
    if getattr(source, "vocab_size", None) and source.vocab_size > q.vocab_size:
        raise ArtifactError(f"{source.path}: was scored with a vocabulary of {source.vocab_size} ids, the student has {q.vocab_size}",
                            "score the rollouts with a teacher that shares the student's tokenizer and vocabulary")
    row_multiple(config)
    if par.context_parallel != 1:
        raise ConfigError("context parallel is not supported by the trainer", "set parallel.context_parallel=1")
    if world_size is None:
        return None
    dp = par.runtime().data_parallel(world_size)
    if config.data.global_batch % dp:
        raise ConfigError(
            f"data.global_batch={config.data.global_batch} is not divisible by the data-parallel size {dp} "
            f"(world size {world_size} / TP {par.tensor_parallel} x PP {par.pipeline_parallel})",
            "set data.global_batch to a multiple of the data-parallel size (world size / (TP x PP))",
        )
    return dp


def find_resume(config: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from, per `checkpoint.resume` (auto | none | a path)."""
    from megatron_lopd.training.checkpointing import find_latest

    run_dir, resume = Path(config.run_dir), config.checkpoint.resume
    if resume == "none":
        if (run_dir / "metrics.jsonl").exists() or find_latest(run_dir / "checkpoints") is not None:
            raise ConfigError(f"{run_dir}: already holds a run and checkpoint.resume=none", "resume it (checkpoint.resume=auto), or choose a new run_dir")
        return None
    if resume == "auto":
        return find_latest(run_dir / "checkpoints")
    if not Path(resume).is_dir():
        raise ArtifactError(f"{resume}: checkpoint.resume does not exist", "pass a checkpoint dir, auto or none")
    return Path(resume)


@dataclass
class Preflight:
    """What the checks found: the trainer builds the run from it."""

    start: StartModel
    source: Any  # data.SequenceSource (what DataProvider.open returned)
    consistency_warnings: list[str]  # opted-out violations: recorded in the manifest, logged loudly
    inputs: dict[str, Any]  # the provenance record (fingerprints of every input)
    resume_from: Path | None = None
    resume_changes: dict[str, list] = field(default_factory=dict)
    data_parallel: int | None = None

    def report(self, config: TrainConfig) -> list[str]:
        """Lines for `lopd pipeline check-train`."""
        par = config.parallel
        lines = [f"loss {config.loss}, {config.train_steps} steps, global batch {config.data.global_batch}",
                 f"start from {self.start.where} ({self.start.kind}, {self.start.fingerprint})",
                 f"data {self.source.path}: {len(self.source)} sequences"]
        lines += [f"CONSISTENCY OPT-OUT: {w}" for w in self.consistency_warnings] or ["teacher and policy consistency: ok"]
        if self.data_parallel is not None:
            world = self.data_parallel * par.tensor_parallel * par.pipeline_parallel
            lines.append(f"layout: world {world} = TP {par.tensor_parallel} x PP {par.pipeline_parallel} x DP {self.data_parallel}")
        if self.resume_from is not None:
            lines.append(f"resumes from {self.resume_from}" + "".join(f"; {k}: {a!r} -> {b!r}" for k, (a, b) in self.resume_changes.items()))
        return lines


def preflight(config: TrainConfig, data, *, world_size: int | None = None, claim: Callable[[], None] | None = None) -> Preflight:
    """Every check that needs neither a GPU nor the model built; raises a one-line LopdError.

    `data`: the run's `DataProvider` (data.OfflineData for store / SFT data). `world_size`:
    the launch's process count when known (the trainer's, or the job's for check-train).
    `claim`: called once the run dir is known to be ours (the trainer locks it there)."""
    from megatron_lopd.training.checkpointing import read_metadata
    from megatron_lopd.training.run_dir import check_run_dir, resume_changes

    config.validate()
    check_run_dir(config)
    if claim is not None:
        claim()
    start = resolve_start_model(config)
    source, lineage, inputs = data.open(config, start)
    tc, full = config.teacher_consistency, data.requires_lineage(config)
    warnings = lineage.check(opt_out=ConsistencyOptOut(tc.allow_inconsistent_teacher, tc.allow_policy_mismatch),
                             require_sft_data_writer=full, require_start=full)
    dp = check_layout(config, start, source, world_size)
    resume_from = find_resume(config)
    changes = {}
    if resume_from is not None:
        changes = resume_changes(resume_from, read_metadata(resume_from).get("trainer", {}), config, inputs)
    return Preflight(start, source, warnings, inputs, resume_from, changes, dp)


def check_environment(config: TrainConfig) -> None:
    """What this machine must offer (the trainer calls it on every rank, before anything starts)."""
    import torch

    from megatron_lopd.models.qwen3 import te_unavailable_reason

    needs = [w for w, on in (("FP8", bool(config.model.fp8)), ("sequence parallel", config.parallel.sequence_parallel),
                             ("model.use_te=true", config.model.use_te == "true"),
                             ("optimizer.precision_aware (TE's FusedAdam)", config.optimizer.precision_aware)) if on]
    why_not = te_unavailable_reason()
    if needs and why_not:
        raise ConfigError(
            f"{' and '.join(needs)} requested, but Transformer Engine is not usable here ({why_not})",
            "run on a GPU node with transformer-engine installed (pip install 'megatron-lopd[te]'), "
            "or set model.fp8= parallel.sequence_parallel=false model.use_te=auto optimizer.precision_aware=false",
        )
    if config.model.fp8 == "current" and not why_not:
        from transformer_engine.common import recipe

        if not hasattr(recipe, "Float8CurrentScaling"):
            import transformer_engine

            raise ConfigError(f"model.fp8=current needs Float8CurrentScaling, which Transformer Engine {transformer_engine.__version__} lacks",
                              "upgrade transformer-engine (>= 2.2), or set model.fp8=delayed")
    if config.optimizer.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("optimizer.cpu_offload moves the optimizer off a GPU, and this machine has none", "set optimizer.cpu_offload=false")
    if config.logging.wandb_project:
        try:
            import wandb  # noqa: F401  (the import is the check)
        except ImportError:
            raise ConfigError("logging.wandb_project is set but wandb is not installed", "pip install wandb, or unset logging.wandb_project") from None


def precision(config: TrainConfig) -> str:
    import torch

    if config.model.precision != "auto":
        return config.model.precision
    return "bf16" if torch.cuda.is_available() else "fp32"
