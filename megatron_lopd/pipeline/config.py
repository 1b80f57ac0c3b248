"""The pipeline's config: one teacher path, the per-stage settings and environments, and the
file / `key=value` loading. Artifact paths derive from `work_dir` (`stages.ArtifactPaths`)."""

# Config dataclasses use real (not string) annotations and spell optional fields `Optional[X]`:
# nemo-run's CLI parser (`trainer.lr=1e-6`) understands neither string annotations nor `X | None`.
# So no `from __future__ import annotations` here.
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_lopd import config as typed_config
from megatron_lopd.errors import ConfigError

CONFIG_NAME = "pipeline.json"  # the config a run was started with, recorded in its work dir

@dataclass
class StageEnv:
    """Where a stage's commands run. On GPU nodes vLLM and Megatron + Transformer Engine pin
    different torch builds, so generation/scoring and training usually get different ones.

    `venv`: a virtual environment (its `bin/` goes first on PATH, its `lopd` runs the stage).
    `python`: an interpreter whose environment has megatron-lopd installed.
    `container_image`: SLURM only (pyxis `srun --container-image`); inside it `lopd` comes from PATH.
    `env`: extra environment variables for the stage's processes.
    """

    venv: Optional[str] = None
    python: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StageEnvs:
    """Per-stage environments. A stage's entry replaces `default`'s interpreter (venv / python /
    container) when it sets one; `env` variables are merged (the stage's win)."""

    default: StageEnv = field(default_factory=StageEnv)
    sft_data: StageEnv = field(default_factory=StageEnv)
    sft: StageEnv = field(default_factory=StageEnv)
    rollouts: StageEnv = field(default_factory=StageEnv)
    score: StageEnv = field(default_factory=StageEnv)
    train: StageEnv = field(default_factory=StageEnv)
    export: StageEnv = field(default_factory=StageEnv)
    eval: StageEnv = field(default_factory=StageEnv)

    def resolve(self, stage: str) -> StageEnv:
        own, default = getattr(self, stage), self.default
        base = own if (own.venv or own.python or own.container_image) else default
        return StageEnv(
            venv=base.venv,
            python=base.python,
            container_image=base.container_image,
            container_mounts=list(base.container_mounts),
            env={**default.env, **own.env},
        )


@dataclass
class EngineSettings:
    """How an inference-engine stage (SFT data, rollouts, scoring, evaluation) uses its nodes.

    Each node runs `engines_per_node` engine processes side by side, each on its own
    `tensor_parallel` GPUs (`CUDA_VISIBLE_DEVICES`), each owning every N-th chunk / shard of the
    artifact (N = engines over all `nodes`): the merged result is byte-identical to one
    process's. `engines_per_node=0`: as many as the node's GPUs allow (GPUs / TP; one on a
    machine without GPUs). `max_model_len`: None = what the work needs (longest prompt +
    max_tokens, longest record for scoring), never the model card's context."""

    backend: str = "vllm"
    dtype: str = "bfloat16"
    tensor_parallel: int = 1
    engines_per_node: int = 0
    nodes: int = 1
    max_model_len: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None  # vLLM's fraction of each GPU (None: its 0.9)
    extra_args: list[str] = field(default_factory=list)

    def engine_args(self) -> list[str]:
        """The `lopd generate|score|eval` flags of these settings."""
        args = ["--backend", self.backend, "--dtype", self.dtype, "--tensor-parallel", str(self.tensor_parallel)]
        args += ["--max-model-len", str(self.max_model_len)] if self.max_model_len else []
        args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)] if self.gpu_memory_utilization else []
        return args

    def validate(self, stage: str) -> None:
        checks = (
            ("tensor_parallel", self.tensor_parallel >= 1, "use 1 or more GPUs per engine"),
            ("engines_per_node", self.engines_per_node >= 0, "use 0 (every GPU of the node) or a count"),
            ("nodes", self.nodes >= 1, "use 1 or more nodes"),
            ("gpu_memory_utilization", self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1, "use a fraction in (0, 1], e.g. 0.9"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1, "leave it unset (what the work needs) or give a length"),
        )
        for name, ok, fix in checks:
            if not ok:
                raise ConfigError(f"pipeline config: {stage}.{name}={getattr(self, name)} is not valid", fix)


@dataclass
class GenerateSettings(EngineSettings):
    """`lopd generate` knobs (the paper: temperature 0.7, top-p 0.9)."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 16384
    seed: int = 0
    thinking: Optional[str] = None  # "on" | "off" | None (the chat template's default)
    format: Optional[str] = None  # the prompt file's data format (`lopd data formats`); None: `prompts`

    def validate(self, stage: str) -> None:
        super().validate(stage)
        self.prompt_source("prompts")  # an unknown format: refused with the config

    def prompt_source(self, prompts: str):
        """The prompt file as `lopd generate --format` reads it."""
        from megatron_lopd.datasets import DataSource, data_format

        return DataSource(Path(prompts), data_format(self.format or "prompts"))


@dataclass
class ScoreSettings(EngineSettings):
    """`lopd score` knobs."""

    top_k: int = 16


@dataclass
class TrainSettings:
    """`lopd train --config CONFIG key=value ...`. The typed knobs below are the ones a launcher
    usually changes; anything else goes into `overrides` (trainer config keys)."""

    config: str = "lightning_opd"  # a named trainer preset or a config file
    lr: Optional[float] = None
    steps: Optional[int] = None
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    tensor_parallel: Optional[int] = None
    expert_parallel: Optional[int] = None
    sequence_parallel: Optional[bool] = None
    save_interval: Optional[int] = None
    nproc_per_node: int = 1  # > 1: torchrun
    nnodes: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SuiteOverrides:
    """Settings applied to every benchmark of an evaluation suite (smoke runs); None: each benchmark's own."""

    samples_per_problem: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None

    def eval_args(self) -> list[str]:
        """The `lopd eval` flags of the settings given."""
        flags = {"samples_per_problem": "--samples-per-problem", "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p"}
        return [arg for name, flag in flags.items() if getattr(self, name) is not None for arg in (flag, str(getattr(self, name)))]


@dataclass
class EvalSettings(EngineSettings):
    """`lopd eval` knobs (the paper: avg@64 at up to 32K tokens) for the one data file `eval_data`;
    or, with `suite` (a built-in suite such as `paper`, or a suite file), the suite's benchmarks,
    each with its own data format, grader and sampling. `suite_data`: benchmark -> data path (key
    `NAME:FORMAT` for a file in another format); `suite_overrides` changes every benchmark's sampling."""

    samples_per_problem: int = 1
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    suite: Optional[str] = None
    suite_data: dict[str, str] = field(default_factory=dict)
    suite_overrides: SuiteOverrides = field(default_factory=SuiteOverrides)

    def suite_run(self):
        """The SuiteRun the stage's `lopd eval --suite` command runs (checked: the suite exists, names its
        benchmarks): `suite_overrides` and the engine settings apply to every benchmark."""
        from megatron_lopd.evaluation.suite import suite_run
        from megatron_lopd.generation.backends import resolve_dtype

        overrides = {f.name: getattr(self.suite_overrides, f.name) for f in dataclasses.fields(SuiteOverrides)}
        overrides.update(backend=self.backend, dtype=resolve_dtype(self.dtype), tensor_parallel=self.tensor_parallel,
                         max_model_len=self.max_model_len, gpu_memory_utilization=self.gpu_memory_utilization)
        return suite_run(self.suite, [f"{name}={path}" for name, path in self.suite_data.items()], overrides)


@dataclass
class PipelineConfig:
    """Everything the consistent-teacher pipeline needs. Artifact paths derive from `work_dir`."""

    work_dir: str = "runs/pipeline"
    teacher: str = ""  # HF dir of the teacher: writes the SFT data AND scores the rollouts
    base_student: str = ""  # HF dir of the base student B
    sft_prompts: str = ""
    opd_prompts: str = ""
    eval_data: Optional[str] = None  # None (and no eval.suite): no eval stage
    sft_data: GenerateSettings = field(default_factory=GenerateSettings)
    sft: TrainSettings = field(default_factory=lambda: TrainSettings(config="sft"))
    rollouts: GenerateSettings = field(default_factory=lambda: GenerateSettings(max_tokens=4096))
    score: ScoreSettings = field(default_factory=ScoreSettings)
    trainer: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    envs: StageEnvs = field(default_factory=StageEnvs)

    def validate(self) -> None:
        required = {"teacher": self.teacher, "base_student": self.base_student, "sft_prompts": self.sft_prompts, "opd_prompts": self.opd_prompts, "work_dir": self.work_dir}
        for name, value in required.items():
            if not value:
                raise ConfigError(f"pipeline config: {name} is not set", f"set {name}=PATH")
        for name in (f.name for f in dataclasses.fields(self.envs)):  # "default" and every stage
            env = getattr(self.envs, name)
            if env.venv and env.python:
                raise ConfigError(f"pipeline config: envs.{name} sets both venv and python", "set one of them")
        for stage in ("sft_data", "rollouts", "score", "eval"):
            getattr(self, stage).validate(stage)
        if self.eval.suite and self.eval_data:
            raise ConfigError("pipeline config: both eval_data and eval.suite are set", "evaluate one data file (eval_data) or a suite (eval.suite), not both")
        if self.eval.suite_data and not self.eval.suite:
            raise ConfigError("pipeline config: eval.suite_data without eval.suite", "name the suite: eval.suite=paper")

    def absolute(self) -> "PipelineConfig":
        """A copy with absolute paths: jobs on other nodes start in other directories."""
        from megatron_lopd.evaluation.suite import SUITES

        fields = ("work_dir", "teacher", "base_student", "sft_prompts", "opd_prompts", "eval_data")
        suite = self.eval.suite
        if suite and suite not in SUITES:  # a suite file (a built-in suite is a name)
            suite = str(Path(suite).absolute())
        evals = dataclasses.replace(self.eval, suite=suite, suite_data={k: str(Path(v).absolute()) for k, v in self.eval.suite_data.items()})
        return dataclasses.replace(self, eval=evals, **{f: str(Path(getattr(self, f)).absolute()) for f in fields if getattr(self, f)})

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline config") -> "PipelineConfig":
        return typed_config.from_dict(cls, data, where=where)

    def save(self, path: str | Path) -> Path:
        from megatron_lopd.runtime.files import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> "PipelineConfig":
        """Read a JSON / TOML / YAML file, then apply `key=value` overrides (`trainer.lr=1e-6`)."""
        return typed_config.apply_overrides(cls.from_dict(typed_config.load_file(path), where=str(path)), overrides)
