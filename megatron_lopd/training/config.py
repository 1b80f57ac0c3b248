"""Typed training configuration: dataclasses, named presets, files and `key=value` overrides.

One way to configure a run: start from a named preset (`lightning_opd`, `sft`,
`tiny_cpu`) or a JSON / YAML / TOML file, then apply `key=value` overrides with dotted
paths (`optimizer.lr=1e-5 data.store=/data/store parallel.tensor_parallel=4`), read by the
one config engine (megatron_lopd/config.py: its rules convert values; unknown keys name the
closest ones).

Batch semantics (the paper's "global batch 256 sequences"): one optimizer step consumes
exactly `data.global_batch` sequences of the shuffled data stream, split evenly across
data-parallel ranks (so global_batch must be divisible by DP). On each rank the
sequences are packed whole (never split) into rows of `data.seq_length` tokens, and
`data.micro_batch_size` rows form one micro-batch: the token budget of a micro-batch is
micro_batch_size x seq_length. The number of micro-batches follows from the packing.
The loss is the mean over each sequence's response tokens, then the mean over the
global batch's sequences, however the batch was split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_lopd.config import FILE_SUFFIXES, apply_overrides, from_dict
from megatron_lopd.config import load_file as read_config_file
from megatron_lopd.errors import ConfigError

LOSS_REDUCTIONS = ("sequence_mean", "token_mean")  # = training.losses.REDUCTIONS (a test checks)
PRECISIONS = ("auto", "fp32", "bf16")
FP8_RECIPES = ("", "delayed", "current")
RECOMPUTE = ("", "full", "selective")
SCHEDULES = ("constant", "cosine")
RESUME = ("auto", "none")  # or a checkpoint path
EXPORT_DTYPES = ("auto", "bfloat16", "float16", "float32")
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")  # training/checkpointing.py says which does what


@dataclass
class ModelConfig:
    """The student. `start_from`: a Hugging Face dir or a Megatron checkpoint dir (from
    `lopd convert from-hf` or a training run). `named`: a named Qwen3 shape with random
    weights instead (benchmarks only; no provenance)."""

    start_from: str = ""
    named: str = ""
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: str = ""  # "" (off) | "delayed" (DelayedScaling) | "current" (Float8CurrentScaling); needs TE
    fp8_amax_history_len: int = 1024  # delayed scaling only
    recompute: str = ""  # "" | "full" | "selective" activation recompute
    use_te: str = "auto"  # auto: the Transformer Engine spec when TE imports and CUDA is present; "true" | "false"
    export_dtype: str = "auto"  # the HF export's tensors and config.json: auto (the start model's) | bfloat16 | float16 | float32


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    # Tensor parallel inside each expert (MoE only). 1, as in the official MoE run: experts are
    # small, and TP 4 x EP 8 on 8 GPUs is only possible when experts are not also split by TP.
    expert_tensor_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False  # needs TE on GPU; requires tensor_parallel > 1
    use_distributed_optimizer: bool = True

    def runtime(self):
        from megatron_lopd.runtime import ParallelConfig as RuntimeParallel

        return RuntimeParallel(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RuntimeParallel)})


@dataclass
class OptimizerConfig:
    """Adam (decoupled weight decay, megatron's "adam"); defaults are the paper's."""

    lr: float = 2e-6
    min_lr: float = 0.0  # cosine floor
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # 0 disables clipping (the grad norm is still logged)
    # Memory options of the official MoE run (megatron-core's own optimizer flags). Offload keeps
    # `cpu_offload_fraction` of the Adam state and step on the CPU (needs the distributed
    # optimizer); `overlap_cpu_offload` overlaps its device<->host copies with compute;
    # `precision_aware` lets TE's FusedAdam keep main params and moments itself (needs TE).
    cpu_offload: bool = False
    cpu_offload_fraction: float = 1.0
    overlap_cpu_offload: bool = True
    precision_aware: bool = False


@dataclass
class ScheduleConfig:
    kind: str = "constant"  # constant | cosine (both with optional linear warmup)
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps == 0: fraction of decay_steps
    decay_steps: int = 0  # cosine horizon; 0 = the run's train steps


@dataclass
class DataConfig:
    """`store`: the teacher store (Lightning OPD and top-k losses). `sft_data`: the SFT
    artifact: the training data of the `sft` loss, and for the other losses the artifact
    whose generator the store's teacher must be (teacher consistency)."""

    store: str = ""
    sft_data: str = ""
    global_batch: int = 256  # sequences per optimizer step, all DP ranks together
    seq_length: int = 8192  # tokens per packed row; <= the model's context
    micro_batch_size: int = 1  # rows per micro-batch
    # > 0: dynamic batching instead of fixed rows. A micro-batch is one packed row of up to this
    # many tokens, trimmed to what it holds (a sequence longer than the budget gets a row of its
    # own, up to seq_length); the number of micro-batches follows. The official MoE run: 12,288.
    micro_batch_tokens: int = 0
    pack: bool = True  # several sequences per row (block-diagonal causal attention)
    trim_padding: bool = True  # trim micro-batches to their longest row (PP=1 only)
    pad_to_multiple: int = 8
    seed: int = 1234  # shuffle seed: epoch e is a permutation drawn from (seed, e)
    shuffle: bool = True
    prefetch: bool = True  # read the next step's sequences in a background thread


@dataclass
class CheckpointConfig:
    save_every: int = 50  # steps; 0 saves only at the end
    keep_last: int = 2  # 0 keeps every checkpoint
    resume: str = "auto"  # auto: latest in the run dir if any | none | a checkpoint dir
    export_hf: bool = True  # export the final model to <run_dir>/hf
    # Comma-separated keys a resume may change (optimizer.lr, optimizer.min_lr, optimizer.clip_grad,
    # optimizer.weight_decay): applied from the resumed step on and recorded in manifest.json.
    resume_changes: str = ""
    # The distributed optimizer's state in checkpoints: "dp_reshardable" (cheap; a resume may change
    # the DP size only) | "fully_reshardable" (a resume may change TP / PP / EP too; gathers the
    # state at every save). See training/checkpointing.py.
    optimizer_format: str = "dp_reshardable"


@dataclass
class LoggingConfig:
    log_every: int = 1  # console lines; metrics.jsonl always gets every step
    tensorboard: bool = True
    wandb_project: str = ""  # W&B only when set and wandb imports
    wandb_entity: str = ""
    wandb_run_name: str = ""
    peak_tflops: float = 0.0  # per-GPU dense peak for MFU; 0 = from the device name (H100 SXM bf16: 989, PCIe: 756)
    progress: bool = True  # tqdm bar on rank 0
    top1_agreement: bool = True  # read the store's top-k for the teacher top-1 agreement metric


@dataclass
class TeacherConsistencyConfig:
    """DESIGN section 4. `sft_data_generator`: the SFT data's generator fingerprint when
    `data.sft_data` is not at hand. The allow_* switches are research opt-outs: logged loudly
    and recorded in the run's metadata."""

    sft_data_generator: str = ""
    allow_inconsistent_teacher: bool = False
    allow_policy_mismatch: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    loss: str = "lightning_opd"
    loss_reduction: str = "sequence_mean"  # the paper's; or "token_mean" (losses.py)
    advantage_clip: float = 0.0  # lightning_opd only: clip A to [-c, c]; 0 = no clip (paper-faithful)
    train_steps: int = 150
    epochs: float = 0.0  # > 0: train_steps = ceil(epochs * len(data) / global_batch)
    seed: int = 1234  # model-parallel RNG seed
    max_consecutive_nonfinite: int = 5  # stop after this many NaN/inf steps in a row
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    teacher_consistency: TeacherConsistencyConfig = field(default_factory=TeacherConsistencyConfig)

    def validate(self) -> "TrainConfig":
        """Checks that need no model or world size (those come at start, before compute)."""
        from megatron_lopd.training.losses import LOSSES  # what each loss reads and allows: its LossSpec

        choices = (
            ("loss", self.loss, tuple(LOSSES)),
            ("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS),
            ("model.precision", self.model.precision, PRECISIONS),
            ("model.fp8", self.model.fp8, FP8_RECIPES),
            ("model.recompute", self.model.recompute, RECOMPUTE),
            ("model.use_te", self.model.use_te, ("auto", "true", "false")),
            ("model.export_dtype", self.model.export_dtype, EXPORT_DTYPES),
            ("checkpoint.optimizer_format", self.checkpoint.optimizer_format, OPTIMIZER_FORMATS),
            ("schedule.kind", self.schedule.kind, SCHEDULES),
        )
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}", f"set {key} to one of them")
        positive = (
            ("data.global_batch", self.data.global_batch),
            ("data.seq_length", self.data.seq_length),
            ("data.micro_batch_size", self.data.micro_batch_size),
            ("data.pad_to_multiple", self.data.pad_to_multiple),
            ("max_consecutive_nonfinite", self.max_consecutive_nonfinite),
            ("logging.log_every", self.logging.log_every),
            ("optimizer.lr", self.optimizer.lr),
        ) + tuple((f"parallel.{f.name}", getattr(self.parallel, f.name)) for f in dataclasses.fields(self.parallel) if f.type in ("int", int))
        for key, value in positive:
            if not value > 0:
                raise ConfigError(f"{key}={value} must be positive", f"set {key} to a positive value")
        spec = LOSSES[self.loss]
        if self.advantage_clip < 0 or (self.advantage_clip and not spec.clippable):
            raise ConfigError(f"advantage_clip={self.advantage_clip} with loss {self.loss!r}",
                              "advantage_clip is a positive clip for loss=lightning_opd only (0 = no clip)")
        if self.train_steps <= 0 and self.epochs <= 0:
            raise ConfigError("train_steps and epochs are both 0", "set train_steps=N or epochs=E")
        if not (0 <= self.optimizer.adam_beta1 < 1 and 0 <= self.optimizer.adam_beta2 < 1):
            raise ConfigError("Adam betas must lie in [0, 1)", "set optimizer.adam_beta1/adam_beta2 in [0, 1)")
        if not 0 <= self.schedule.warmup_fraction < 1:
            raise ConfigError(f"schedule.warmup_fraction={self.schedule.warmup_fraction} is outside [0, 1)", "use a fraction below 1")
        if bool(self.model.start_from) == bool(self.model.named):
            raise ConfigError(
                "exactly one of model.start_from (a HF or Megatron checkpoint dir) and model.named must be set",
                "pass model.start_from=DIR (or model.named=NAME for a random-weight benchmark)",
            )
        needs = spec.data
        if not getattr(self.data, needs):
            raise ConfigError(f"loss {self.loss!r} reads data.{needs}, which is not set", f"pass data.{needs}=DIR")
        if self.parallel.sequence_parallel and self.parallel.tensor_parallel == 1:
            raise ConfigError("sequence_parallel needs tensor_parallel > 1", "set parallel.tensor_parallel>=2 or sequence_parallel=false")
        self._validate_memory_options()
        return self

    def _validate_memory_options(self) -> None:
        o, d = self.optimizer, self.data
        if o.cpu_offload and not self.parallel.use_distributed_optimizer:
            raise ConfigError("optimizer.cpu_offload needs the distributed optimizer",
                              "set parallel.use_distributed_optimizer=true or optimizer.cpu_offload=false")
        if not 0 < o.cpu_offload_fraction <= 1:
            raise ConfigError(f"optimizer.cpu_offload_fraction={o.cpu_offload_fraction} is outside (0, 1]", "use a fraction in (0, 1]")
        if o.precision_aware and not self.parallel.use_distributed_optimizer:
            raise ConfigError("optimizer.precision_aware needs the distributed optimizer",
                              "set parallel.use_distributed_optimizer=true or optimizer.precision_aware=false")
        if d.micro_batch_tokens < 0:
            raise ConfigError(f"data.micro_batch_tokens={d.micro_batch_tokens} is negative", "use 0 (fixed rows) or a token budget")
        if d.micro_batch_tokens and (not d.pack or self.parallel.pipeline_parallel > 1):
            raise ConfigError(
                "data.micro_batch_tokens (dynamic batching) needs data.pack=true and pipeline_parallel=1 "
                "(pipeline stages exchange fixed shapes)",
                "set data.micro_batch_tokens=0 and use data.micro_batch_size rows of data.seq_length tokens")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_file(path: str | Path) -> TrainConfig:
    """A JSON, YAML or TOML file holding a (partial, nested) TrainConfig; its optional `base`
    key names the preset that the keys it leaves out come from."""
    data = read_config_file(path)
    base = data.pop("base", None)
    return from_dict(TrainConfig, data, where=str(path), base=named_config(base) if base else None)


# --------------------------------------------------------------------------------------
# Named presets.


def lightning_opd_defaults() -> TrainConfig:
    """The paper's Lightning OPD setting: Adam lr 2e-6 constant, betas (0.9, 0.98), wd 0.1,
    global batch 256 sequences, ~150 steps; responses up to 4,096 tokens after the prompt."""
    return TrainConfig(loss="lightning_opd", train_steps=150, data=DataConfig(global_batch=256, seq_length=8192))


def sft_defaults() -> TrainConfig:
    """The paper's SFT stage: lr 8e-5 cosine with 10 % warmup, 3,000 steps, 16K packed rows.
    Betas / weight decay / batch are not given by the paper: ours follow the OPD defaults."""
    return TrainConfig(
        loss="sft",
        train_steps=3000,
        optimizer=OptimizerConfig(lr=8e-5, min_lr=0.0),
        schedule=ScheduleConfig(kind="cosine", warmup_fraction=0.1),
        data=DataConfig(global_batch=256, seq_length=16384),
    )


def tiny_cpu() -> TrainConfig:
    """A few-second Lightning OPD run of the tiny model on CPU (tests, demo)."""
    return TrainConfig(
        run_dir="runs/tiny",
        loss="lightning_opd",
        train_steps=8,
        model=ModelConfig(precision="fp32", use_te="false"),
        optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0),
        data=DataConfig(global_batch=8, seq_length=128, micro_batch_size=1, prefetch=False),
        checkpoint=CheckpointConfig(save_every=4, keep_last=2, export_hf=False),
        logging=LoggingConfig(tensorboard=False, progress=False),
    )


NAMED_CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "lightning_opd": lightning_opd_defaults,
    "sft": sft_defaults,
    "tiny_cpu": tiny_cpu,
}


def named_config(name: str) -> TrainConfig:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"unknown config {name!r}", f"use a config file or one of {', '.join(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]()


def resolve_config(config: str, overrides: list[str] = ()) -> TrainConfig:
    """`--config FILE|NAME` plus overrides, validated (what `lopd train` runs)."""
    base = load_file(config) if Path(config).suffix in FILE_SUFFIXES else named_config(config)
    return apply_overrides(base, list(overrides)).validate()

