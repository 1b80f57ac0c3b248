"""The consistent-teacher pipeline, defined once: stages with declared inputs and outputs.

    teacher --generate--> sft_data --train(sft)--> sft (R, + HF export) --generate(R)--> rollouts
      --score(teacher)--> store --train(lightning)--> train --convert to-hf--> export --eval--> eval

`PipelineConfig` has ONE teacher path; `build_stages` hands that very object to the
SFT-data stage and to the scoring stage, so the model that writes the SFT data is the
model that scores the rollouts by construction (DESIGN section 4; the trainer checks it
again from the artifacts' manifests).

Every stage runs `lopd` subcommands (torchrun for multi-process training) in its own
environment (`StageEnv`: a venv, a python, a container image for SLURM) and has an
`is_done()` check that verifies its output; a stage whose output verifies is skipped,
so a rerun continues where it stopped. The same stages are run by `run_local` (plain
subprocesses), by `lopd pipeline run`, and by the nemo-run recipes (one SLURM job per
stage, chained by dependencies).
"""


import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError

STAGE_NAMES = ("sft_data", "sft", "rollouts", "score", "train", "export", "eval")
CONFIG_NAME = "pipeline.json"


# --------------------------------------------------------------------------- configuration
# Config dataclasses use real (not string) annotations and spell optional fields `Optional[X]`:
# nemo-run's CLI parser (`trainer.lr=1e-6`) understands neither string annotations nor `X | None`.
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
class GenerateSettings:
    """`lopd generate` knobs (the paper: temperature 0.7, top-p 0.9)."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 16384
    seed: int = 0
    backend: str = "vllm"
    dtype: str = "bfloat16"
    thinking: Optional[str] = None  # "on" | "off" | None (the chat template's default)
    shards: int = 1  # > 1: N `--shard i/N` processes (SLURM: one job, N tasks)
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ScoreSettings:
    """`lopd score` knobs."""

    top_k: int = 16
    backend: str = "vllm"
    dtype: str = "bfloat16"
    shards: int = 1  # > 1: N `--shard i/N` workers, then one `--finalize`
    extra_args: list[str] = field(default_factory=list)


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
class EvalSettings:
    """`lopd eval` knobs (the paper: avg@64 at up to 32K tokens)."""

    samples_per_problem: int = 1
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    backend: str = "vllm"
    extra_args: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """Everything the consistent-teacher pipeline needs. Artifact paths derive from `work_dir`."""

    work_dir: str = "runs/pipeline"
    teacher: str = ""  # HF dir of the teacher: writes the SFT data AND scores the rollouts
    base_student: str = ""  # HF dir of the base student B
    sft_prompts: str = ""
    opd_prompts: str = ""
    eval_data: Optional[str] = None  # None: no eval stage
    sft_data: GenerateSettings = field(default_factory=GenerateSettings)
    sft: TrainSettings = field(default_factory=lambda: TrainSettings(config="sft"))
    rollouts: GenerateSettings = field(default_factory=lambda: GenerateSettings(max_tokens=4096))
    score: ScoreSettings = field(default_factory=ScoreSettings)
    trainer: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    envs: StageEnvs = field(default_factory=StageEnvs)

    def env_for(self, stage: str) -> StageEnv:
        return self.envs.resolve(stage)

    def validate(self) -> None:
        required = {"teacher": self.teacher, "base_student": self.base_student, "sft_prompts": self.sft_prompts, "opd_prompts": self.opd_prompts, "work_dir": self.work_dir}
        for name, value in required.items():
            if not value:
                raise ConfigError(f"pipeline config: {name} is not set", f"set {name}=PATH")
        for name in ("default", *STAGE_NAMES):
            env = getattr(self.envs, name)
            if env.venv and env.python:
                raise ConfigError(f"pipeline config: envs.{name} sets both venv and python", "set one of them")

    def absolute(self) -> "PipelineConfig":
        """A copy with absolute paths: jobs on other nodes start in other directories."""
        fields = ("work_dir", "teacher", "base_student", "sft_prompts", "opd_prompts", "eval_data")
        return dataclasses.replace(self, **{f: str(Path(getattr(self, f)).absolute()) for f in fields if getattr(self, f)})

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline config") -> "PipelineConfig":
        return _build(cls, data, where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> "PipelineConfig":
        """Read a JSON / TOML / YAML file, then apply `key=value` overrides (`trainer.lr=1e-6`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: pipeline config file does not exist", "pass an existing --config FILE")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # a parse error of any of the three formats
            raise ConfigError(f"{path}: cannot parse ({exc})", "fix the file's syntax") from exc
        for item in overrides:
            _apply_override(data, item)
        return cls.from_dict(data, where=str(path))


def _build(cls, data: Any, where: str):
    """Nested dataclass from plain data, with one clear error per unknown key or wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}", "check the config structure")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}", f"use {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}: {key}")
    return cls(**kwargs)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(hint, value, where: str):
    """A file value or an override string as the field's type (Optional[X], scalars, list, dict)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # the configs only use Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value, where)
    if hint in _SCALARS:
        if isinstance(value, str) and hint is not str:
            value = _parse_scalar(value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {value!r} is not {_SCALARS[hint]}", "fix the value")
        return value
    container = origin or hint
    if container in (list, dict) and not isinstance(value, container):
        raise ConfigError(f"{where}: {value!r} is not a {container.__name__}", "fix the value")
    return value


def _parse_scalar(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", "write overrides as section.key=value, e.g. trainer.lr=1e-6")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section", "check the key path")
    node[parts[-1]] = _parse_scalar(raw)


# --------------------------------------------------------------------------- artifact layout
@dataclass(frozen=True)
class ArtifactPaths:
    """Where each stage writes, under the pipeline's work dir."""

    work_dir: Path

    @property
    def sft_data(self) -> Path:
        return self.work_dir / "sft_data"

    @property
    def sft_run(self) -> Path:
        return self.work_dir / "sft"

    @property
    def sft_model(self) -> Path:  # R in Hugging Face format (the trainer's export): rollout policy, OPD's start
        return self.sft_run / "hf"

    @property
    def rollouts(self) -> Path:
        return self.work_dir / "rollouts"

    @property
    def store(self) -> Path:
        return self.work_dir / "teacher_store"

    @property
    def opd_run(self) -> Path:
        return self.work_dir / "opd"

    @property
    def student_model(self) -> Path:
        return self.work_dir / "student_hf"

    @property
    def eval(self) -> Path:
        return self.work_dir / "eval"

    @property
    def logs(self) -> Path:
        return self.work_dir / "logs"


# --------------------------------------------------------------------------- verification
def verify_rollouts(path: Path) -> str:
    from megatron_lopd.generation.artifact import RolloutArtifact

    artifact = RolloutArtifact.open(path, verify=True)
    return f"{len(artifact)} records"


def verify_store(path: Path) -> str:
    """Complete (finalized) and every shard's checksums valid."""
    from megatron_lopd.store import verify_store as _verify

    report = _verify(path)
    if not report.ok:
        more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise ArtifactError(f"{path}: teacher store does not verify: {report.first_problem}{more}", "rerun the scoring stage (it resumes) or `lopd score --finalize`")
    return f"{report.shards_checked} shards, {report.tokens_checked} tokens checked"


def verify_run(path: Path) -> str:
    """A finished training run: its manifest says complete and the latest checkpoint's metadata is there."""
    from megatron_lopd.provenance import Manifest
    from megatron_lopd.training.checkpointing import find_latest, read_metadata

    manifest = Manifest.read(path, kind="run")
    if manifest.extra.get("status") != "complete":
        raise ArtifactError(f"{path}: training run is {manifest.extra.get('status', 'unfinished')}", "rerun the stage: it resumes from the latest checkpoint")
    latest = find_latest(path / "checkpoints")
    if latest is None:
        raise ArtifactError(f"{path}: no checkpoint (checkpoints/latest is missing)", "rerun the training stage")
    meta = read_metadata(latest)
    return f"{latest.name}, step {meta.get('iteration')}"


def _hf_files(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: no config.json", "rerun the stage that exports it")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ArtifactError(f"{path}: no weight files", "rerun the stage that exports it")


def verify_hf_export(path: Path) -> str:
    """An HF export: config.json + weights + a manifest whose fingerprint matches the content."""
    from megatron_lopd.provenance import Manifest, model_fingerprint

    _hf_files(path)
    manifest = Manifest.read(path, kind="hf_export")
    actual = model_fingerprint(path)
    if manifest.fingerprint != actual:
        raise ArtifactError(f"{path}: weights changed since export (manifest {manifest.fingerprint}, content {actual})", "rerun the export stage")
    return f"{actual} from {manifest.inputs.get('checkpoint')}"


def verify_sft(path: Path) -> str:
    """The SFT stage: a finished run whose HF export (the trainer's `<run>/hf`) is the one it recorded."""
    from megatron_lopd.provenance import Manifest, model_fingerprint

    run_dir = path.parent
    detail = verify_run(run_dir)
    _hf_files(path)
    recorded = Manifest.read(run_dir, kind="run").extra.get("hf_fingerprint")
    actual = model_fingerprint(path)
    if recorded != actual:
        raise ArtifactError(f"{path}: HF export does not match the run's record ({recorded} vs {actual})", "rerun the SFT stage (it resumes and re-exports)")
    return f"{detail}, export {actual}"


def verify_eval(path: Path) -> str:
    from megatron_lopd.evaluation.evaluate import read_results

    _records, summary = read_results(path)
    return summary.console_line("eval")


def check_training_inputs(config: str, overrides: Sequence[str] = (), world_size: Optional[int] = None) -> list[str]:
    """What a training job needs, checked without a GPU before it is queued: the trainer config and
    overrides, the start checkpoint, the data (store complete with valid checksums, or the SFT
    artifact), teacher and policy consistency, the parallel layout against `world_size`, and an
    explicit resume checkpoint. Raises a LopdError naming the problem; returns report lines."""
    from megatron_lopd.models.qwen3 import check_parallel_layout
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.loop import check_consistency, open_data_source, resolve_start_model

    cfg = resolve_config(config, list(overrides))
    lines = [f"config {config}: loss {cfg.loss}, {cfg.train_steps} steps, global batch {cfg.data.global_batch}"]
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).is_dir():
        raise ArtifactError(f"{resume}: checkpoint.resume does not exist", "pass an existing checkpoint dir, auto or none")
    start = resolve_start_model(cfg)
    lines.append(f"start from {start.path or cfg.model.named} ({start.kind}, {start.fingerprint})")
    if cfg.loss == "sft":
        lines.append(f"SFT data {cfg.data.sft_data}: {verify_rollouts(Path(cfg.data.sft_data))}")
    else:
        lines.append(f"store {cfg.data.store}: {verify_store(Path(cfg.data.store))}")
    source = open_data_source(cfg)
    warnings, _record = check_consistency(cfg, start, source)
    lines += [f"CONSISTENCY OPT-OUT: {w}" for w in warnings] or ["teacher and policy consistency: ok"]
    par = cfg.parallel
    check_parallel_layout(start.qwen3, par.tensor_parallel, par.pipeline_parallel, par.expert_parallel, where=str(start.path or cfg.model.named))
    if world_size is not None:
        dp = par.runtime().data_parallel(world_size)
        if cfg.data.global_batch % dp:
            raise ConfigError(
                f"data.global_batch={cfg.data.global_batch} is not divisible by the data-parallel size {dp} "
                f"(world size {world_size} / TP {par.tensor_parallel} x PP {par.pipeline_parallel})",
                "change the global batch, the number of ranks or the parallel layout",
            )
        lines.append(f"layout: world {world_size} = TP {par.tensor_parallel} x PP {par.pipeline_parallel} x DP {dp}")
    return lines


def check_scoring_inputs(rollouts: str | Path, teacher: str | Path, sft_data: str | Path | None = None) -> list[str]:
    """Before hours of teacher scoring: the rollouts are complete and carry the sampler's
    log-probs, the teacher is a model with the rollouts' tokenizer, and (given the SFT data)
    the teacher is the model that wrote the SFT data. Raises a LopdError; returns report lines."""
    from megatron_lopd.generation.artifact import RolloutArtifact
    from megatron_lopd.generation.base import inspect_model_dir
    from megatron_lopd.provenance import check_teacher_consistency, model_fingerprint, tokenizer_fingerprint

    art = RolloutArtifact.open(rollouts, verify=True)
    if art.kind != "rollouts":
        raise ArtifactError(f"{rollouts}: is a {art.kind!r} artifact, expected 'rollouts'", "score the rollouts of the SFT model (lopd generate --record-logprobs)")
    inspect_model_dir(teacher)
    teacher_fp = model_fingerprint(teacher)
    lines = [f"rollouts {rollouts}: {len(art)} records by {art.generator_fingerprint}", f"teacher {teacher}: {teacher_fp}"]
    sft_generator = None
    tokenizers = {"rollouts": art.tokenizer_fingerprint, "teacher": tokenizer_fingerprint(teacher)}
    if sft_data:
        sft = RolloutArtifact.open(sft_data, verify=False)
        sft_generator = sft.generator_fingerprint
        tokenizers["sft_data"] = sft.tokenizer_fingerprint
    check_teacher_consistency(store_teacher=teacher_fp, sft_data_generator=sft_generator, rollout_policy=None, start_checkpoint=None, tokenizers=tokenizers)
    lines.append("teacher consistency: " + ("ok (the SFT data's generator)" if sft_data else "not checked (no SFT data given)"))
    return lines


# --------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Step:
    """One `lopd` invocation. `nproc_per_node > 1` or `nnodes > 1`: launched with torchrun.
    `shards > 1`: run once per shard with `--shard i/N` appended."""

    args: tuple[Any, ...]  # str() of each is the argument
    nproc_per_node: int = 1
    nnodes: int = 1
    shards: int = 1


@dataclass(frozen=True)
class Stage:
    """A node of the pipeline: what it reads, what it writes, the commands that write it and
    how to tell that its output exists and verifies."""

    name: str
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    steps: tuple[Step, ...]
    verify: Callable[[Path], str]
    env: StageEnv
    # stage that produces each input (absent: an external input, e.g. the teacher)
    producers: dict[str, str] = field(default_factory=dict)
    # True: a partial output cannot be resumed and is deleted before the stage runs
    fresh_output: bool = False
    # checks of the inputs that already exist, before the stage is run or queued (consistency)
    precheck: Optional[Callable[[], None]] = None

    @property
    def output(self) -> Path:
        return next(iter(self.outputs.values()))

    def check(self) -> str:
        """Verify the output; raises LopdError (ArtifactError) when it is missing or broken."""
        if not self.output.exists():
            raise ArtifactError(f"{self.output}: {self.name} output does not exist", f"run stage {self.name}")
        return self.verify(self.output)

    def is_done(self) -> bool:
        try:
            self.check()
            return True
        except LopdError:
            return False
        except Exception:  # a half-written artifact can break a reader in any way: not done
            return False

    def uses_torchrun(self) -> bool:
        return any(s.nproc_per_node > 1 or s.nnodes > 1 for s in self.steps)

    @property
    def nnodes(self) -> int:
        return max(s.nnodes for s in self.steps)

    @property
    def nproc_per_node(self) -> int:
        return max(s.nproc_per_node for s in self.steps)

    def commands(self, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500) -> list[list[str]]:
        """The argv of every process this stage starts on one node, in order."""
        lopd, python = lopd_command(self.env)
        out = []
        for step in self.steps:
            for shard in range(step.shards):
                # explicit, never guessed from the launcher's environment (SLURM array, srun, torchrun)
                args = [str(a) for a in step.args] + ([f"--shard={shard}/{step.shards}"] if _sharded(step.args) else [])
                if step.nproc_per_node > 1 or step.nnodes > 1:
                    out.append(torchrun_command(python, lopd, args, step, node_rank, master_addr, master_port))
                else:
                    out.append([*lopd, *args])
        return out


# TrainSettings knob -> `lopd train` config key (megatron_lopd/training/config.py).
TRAIN_KEYS = {
    "lr": "optimizer.lr",
    "steps": "train_steps",
    "global_batch_size": "data.global_batch",
    "micro_batch_size": "data.micro_batch_size",
    "tensor_parallel": "parallel.tensor_parallel",
    "expert_parallel": "parallel.expert_parallel",
    "sequence_parallel": "parallel.sequence_parallel",
    "save_interval": "checkpoint.save_every",
}


def _sharded(args: Sequence[str]) -> bool:
    return args[0] in ("generate", "score") and "--finalize" not in args


def _train_overrides(settings: TrainSettings, paths: dict[str, Any]) -> list[str]:
    """`key=value` overrides for `lopd train`: the typed knobs, the stage's paths, then `overrides`."""
    values = {key: getattr(settings, knob) for knob, key in TRAIN_KEYS.items() if getattr(settings, knob) is not None}
    values.update(paths)
    values.update(settings.overrides)
    return [f"{k}={_override_text(v)}" for k, v in values.items()]


def _override_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _generate_args(model: Path, prompts: str, out: Path, s: GenerateSettings, kind: str) -> tuple[str, ...]:
    args = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--kind", kind, "--n", str(s.n),
            "--temperature", str(s.temperature), "--top-p", str(s.top_p), "--max-tokens", str(s.max_tokens),
            "--seed", str(s.seed), "--backend", s.backend, "--dtype", s.dtype, "--no-progress"]
    if s.thinking:
        args += ["--thinking", s.thinking]
    if kind == "rollouts":  # R's raw log-prob of each sampled token: the drift monitor's reference
        args.append("--record-logprobs")
    return tuple(args + list(s.extra_args))


def build_stages(config: PipelineConfig) -> list[Stage]:
    """The stage graph. The teacher path is one object, handed to `sft_data` and `score`."""
    config.validate()
    p = ArtifactPaths(Path(config.work_dir))
    teacher = Path(config.teacher)  # ONE object for both teacher stages: consistency by construction
    base = Path(config.base_student)
    sft_overrides = _train_overrides(config.sft, {
        "model.start_from": base, "data.sft_data": p.sft_data, "run_dir": p.sft_run, "checkpoint.export_hf": True})
    opd_overrides = _train_overrides(config.trainer, {
        "model.start_from": p.sft_model, "data.store": p.store, "data.sft_data": p.sft_data, "run_dir": p.opd_run,
        "checkpoint.export_hf": False})
    sft_data = Stage(
        "sft_data",
        inputs={"teacher": teacher, "prompts": Path(config.sft_prompts)},
        outputs={"sft_data": p.sft_data},
        steps=(Step(_generate_args(teacher, config.sft_prompts, p.sft_data, config.sft_data, "sft_data"), shards=config.sft_data.shards),),
        verify=verify_rollouts,
        env=config.env_for("sft_data"),
    )
    sft = Stage(
        "sft",
        inputs={"base_student": base, "sft_data": p.sft_data},
        outputs={"sft_model": p.sft_model, "sft_run": p.sft_run},
        steps=(Step(("train", "--config", config.sft.config, *sft_overrides), nproc_per_node=config.sft.nproc_per_node, nnodes=config.sft.nnodes),),
        verify=verify_sft,
        env=config.env_for("sft"),
        producers={"sft_data": "sft_data"},
    )
    rollouts = Stage(
        "rollouts",
        inputs={"sft_model": p.sft_model, "prompts": Path(config.opd_prompts)},
        outputs={"rollouts": p.rollouts},
        steps=(Step(_generate_args(p.sft_model, config.opd_prompts, p.rollouts, config.rollouts, "rollouts"), shards=config.rollouts.shards),),
        verify=verify_rollouts,
        env=config.env_for("rollouts"),
        producers={"sft_model": "sft"},
    )
    score = Stage(
        "score",
        inputs={"teacher": teacher, "rollouts": p.rollouts},
        outputs={"store": p.store},
        steps=_score_steps(teacher, p, config.score),
        verify=verify_store,
        env=config.env_for("score"),
        producers={"rollouts": "rollouts"},
        precheck=lambda: check_teacher_wrote_sft_data(teacher, p.sft_data),
    )
    train = Stage(
        "train",
        inputs={"sft_model": p.sft_model, "store": p.store, "sft_data": p.sft_data},
        outputs={"opd_run": p.opd_run},
        steps=(Step(("train", "--config", config.trainer.config, *opd_overrides), nproc_per_node=config.trainer.nproc_per_node, nnodes=config.trainer.nnodes),),
        verify=verify_run,
        env=config.env_for("train"),
        producers={"sft_model": "sft", "store": "score", "sft_data": "sft_data"},
        precheck=lambda: _precheck_training(config.trainer, opd_overrides, [sft_data, sft, score]),
    )
    export = Stage(
        "export",
        inputs={"opd_run": p.opd_run},
        outputs={"student_model": p.student_model},
        # A run directory: the newest checkpoint is exported, with the run's provenance.
        steps=(Step(("convert", "to-hf", "--checkpoint", str(p.opd_run), "--out", str(p.student_model))),),
        verify=verify_hf_export,
        env=config.env_for("export"),
        producers={"opd_run": "train"},
        fresh_output=True,
    )
    stages = [sft_data, sft, rollouts, score, train, export]
    if config.eval_data:
        e = config.eval
        stages.append(
            Stage(
                "eval",
                inputs={"student_model": p.student_model, "data": Path(config.eval_data)},
                outputs={"eval": p.eval},
                steps=(Step(("eval", "--model", str(p.student_model), "--data", str(config.eval_data), "--out", str(p.eval),
                             "--samples-per-problem", str(e.samples_per_problem), "--max-tokens", str(e.max_tokens),
                             "--temperature", str(e.temperature), "--top-p", str(e.top_p), "--backend", e.backend, "--no-progress", *e.extra_args)),),
                verify=verify_eval,
                env=config.env_for("eval"),
                producers={"student_model": "export"},
            )
        )
    return stages


def _score_steps(teacher: Path, p: ArtifactPaths, s: ScoreSettings) -> tuple[Step, ...]:
    base = ("score", "--rollouts", str(p.rollouts), "--teacher", str(teacher), "--out", str(p.store),
            "--top-k", str(s.top_k), "--backend", s.backend, "--dtype", s.dtype, "--no-progress", *s.extra_args)
    if s.shards == 1:  # the only worker finalizes the store itself
        return (Step(base),)
    return (Step(base, shards=s.shards), Step(("score", "--out", str(p.store), "--finalize", "--no-progress")))


def select_stages(stages: list[Stage], names: Sequence[str] | str | None) -> list[Stage]:
    """Stages by name ("all", "sft,score", ["train"]), in pipeline order."""
    if names is None or names == "all" or names == ["all"]:
        return list(stages)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [n.strip() for n in names]
    known = {s.name for s in stages}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}", f"choose from {', '.join(s.name for s in stages)} or 'all'")
    return [s for s in stages if s.name in names]


def check_inputs(stages: list[Stage], selected: list[Stage]) -> list[Stage]:
    """Before anything runs or waits in a queue: external inputs exist, every input produced by
    a stage outside this run verifies, and the consistency checks of the inputs that exist
    already pass. Returns the selected stages that are not done yet."""
    by_name = {s.name: s for s in stages}
    running = {s.name for s in selected}
    for stage in selected:
        for key, path in stage.inputs.items():
            producer = stage.producers.get(key)
            if producer is None:
                if not path.exists():
                    raise ArtifactError(f"stage {stage.name}: input {key} {path} does not exist", f"fix the {key} path in the pipeline config")
            elif producer not in running:
                try:
                    by_name[producer].check()
                except LopdError as exc:
                    raise ArtifactError(
                        f"stage {stage.name} needs {key} ({path}) from stage {producer}, which is not done: {exc.what}",
                        f"run stage {producer} first (or the whole pipeline)",
                    ) from None
    pending = [s for s in selected if not s.is_done()]
    for stage in pending:
        if stage.precheck is not None:
            stage.precheck()
    return pending


def check_teacher_wrote_sft_data(teacher: Path, sft_data: Path) -> None:
    """Finished SFT data is skipped on a rerun: if the config's teacher changed since, scoring with
    it would break teacher consistency. Compare content fingerprints before anything runs."""
    from megatron_lopd.generation.artifact import RolloutArtifact
    from megatron_lopd.provenance import check_teacher_consistency, model_fingerprint

    try:
        generator = RolloutArtifact.open(sft_data, verify=False).generator_fingerprint
    except LopdError:
        return  # not written yet: this run writes it with this teacher
    check_teacher_consistency(store_teacher=model_fingerprint(teacher), sft_data_generator=generator,
                              rollout_policy=None, start_checkpoint=None, tokenizers={})


def _precheck_training(settings: TrainSettings, overrides: list[str], needs: list[Stage]) -> None:
    """The full training check (store, consistency, layout) once every input the trainer reads exists."""
    if all(s.is_done() for s in needs):
        check_training_inputs(settings.config, overrides, settings.nproc_per_node * settings.nnodes)


# --------------------------------------------------------------------------- environments
def lopd_command(env: StageEnv) -> tuple[list[str], str]:
    """(argv prefix that runs `lopd`, python interpreter) for a stage environment."""
    if env.venv:  # the venv may live on the cluster only: no existence check here
        return [str(Path(env.venv) / "bin" / "lopd")], str(Path(env.venv) / "bin" / "python")
    if env.python:
        python = env.python
    else:
        python = sys.executable
    beside = Path(python).parent / "lopd"
    if beside.is_file():
        return [str(beside)], python
    found = shutil.which("lopd")
    if found and not (env.venv or env.python):
        return [found], python
    # No console script: run the CLI module through the interpreter itself.
    return [python, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"], python


def torchrun_command(python: str, lopd: list[str], args: list[str], step: Step, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    if lopd[0] == python:  # `python -c ...`: torchrun needs a script; use the module entry instead
        raise ConfigError(f"{python}: no `lopd` console script beside it for torchrun", "pip install megatron-lopd into that environment")
    launch = [python, "-m", "torch.distributed.run", f"--nproc-per-node={step.nproc_per_node}"]
    if step.nnodes == 1:
        launch += ["--standalone"]
    else:
        launch += [f"--nnodes={step.nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    return [*launch, lopd[0], *args]


def stage_environ(env: StageEnv, base: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ if base is None else base)
    if env.venv:
        out["PATH"] = f"{Path(env.venv) / 'bin'}{os.pathsep}{out.get('PATH', '')}"
        out["VIRTUAL_ENV"] = str(env.venv)
    out.update({k: str(v) for k, v in env.env.items()})
    return out


def slurm_node_topology() -> tuple[int, str, int]:
    """(node rank, master address, master port) inside a SLURM allocation; single node otherwise."""
    if "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NNODES", "1")) <= 1:
        return 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29500))
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True).stdout.split()
    port = int(os.environ.get("MASTER_PORT", 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    return int(os.environ.get("SLURM_NODEID", 0)), os.environ.get("MASTER_ADDR", hosts[0]), port


# --------------------------------------------------------------------------- running
@dataclass
class StageResult:
    name: str
    status: str  # "done" (ran now), "skipped" (already done), "failed", "cancelled"
    detail: str = ""
    seconds: float = 0.0


class StageFailed(LopdError):
    """A stage's command failed or its output did not verify afterwards."""

    exit_code = 1


def run_stage(stage: Stage, log_dir: Path | None = None, echo: Callable[[str], None] = print) -> StageResult:
    """Run one stage unless its output already verifies; verify it afterwards."""
    if stage.is_done():
        echo(f"[pipeline] {stage.name}: already done ({stage.check()}), skipped")
        return StageResult(stage.name, "skipped", stage.check())
    if stage.env.container_image and "SLURM_JOB_ID" not in os.environ:
        raise ConfigError(
            f"stage {stage.name} names container image {stage.env.container_image!r}; the local runner starts no containers",
            f"run it with the SLURM executor, or set envs.{stage.name}.venv / python instead",
        )
    node_rank, master_addr, master_port = slurm_node_topology() if stage.uses_torchrun() else (0, "127.0.0.1", 29500)
    if stage.fresh_output and stage.output.exists():
        echo(f"[pipeline] {stage.name}: removing the unfinished output {stage.output}")
        shutil.rmtree(stage.output)
    environ = stage_environ(stage.env)
    t0 = time.monotonic()
    for argv in stage.commands(node_rank, master_addr, master_port):
        echo(f"[pipeline] {stage.name}: {shlex.join(argv)}")
        log = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log = open(log_dir / f"{stage.name}.log", "a")
        try:
            rc = subprocess.run(argv, env=environ, stdout=log, stderr=subprocess.STDOUT if log else None).returncode
        finally:
            if log:
                log.close()
        if rc != 0:
            where = f"; log: {log_dir / (stage.name + '.log')}" if log_dir else ""
            raise StageFailed(f"stage {stage.name}: `{argv[0]} {' '.join(argv[1:3])} ...` exited with {rc}{where}", "fix the cause and rerun: finished stages are skipped")
    if node_rank != 0:
        return StageResult(stage.name, "done", "non-zero node rank", time.monotonic() - t0)
    try:
        detail = stage.check()
    except LopdError as exc:
        raise StageFailed(f"stage {stage.name} finished but its output does not verify: {exc.what}", exc.fix) from None
    seconds = time.monotonic() - t0
    echo(f"[pipeline] {stage.name}: done in {seconds:.1f}s ({detail})")
    return StageResult(stage.name, "done", detail, seconds)


def run_local(config: PipelineConfig, stages: Sequence[str] | str | None = None, *, log_dir: Path | None = None, echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run the selected stages (default: all) in order as subprocesses, skipping finished ones.

    Stops at the first failure: later stages are reported "cancelled" and `StageFailed`
    is raised after the summary is printed.
    """
    config = config.absolute()
    all_stages = build_stages(config)
    selected = select_stages(all_stages, stages)
    check_inputs(all_stages, selected)  # finished stages are reported as skipped below
    config.save(Path(config.work_dir) / CONFIG_NAME)
    results: list[StageResult] = []
    for i, stage in enumerate(selected):
        try:
            results.append(run_stage(stage, log_dir, echo))
        except StageFailed as exc:
            results.append(StageResult(stage.name, "failed", exc.what))
            results += [StageResult(s.name, "cancelled", f"after {stage.name} failed") for s in selected[i + 1:]]
            echo(format_results(results))
            raise
    echo(format_results(results))
    return results


def status(config: PipelineConfig) -> list[StageResult]:
    """Which stages are done (output verifies) and which are pending, with the reason."""
    out = []
    for stage in build_stages(config):
        try:
            out.append(StageResult(stage.name, "done", stage.check()))
        except LopdError as exc:
            out.append(StageResult(stage.name, "pending", exc.what))
        except Exception as exc:
            out.append(StageResult(stage.name, "pending", f"{type(exc).__name__}: {exc}"))
    return out


def format_results(results: Sequence[StageResult]) -> str:
    width = max((len(r.name) for r in results), default=5)
    return "\n".join(f"  {r.name:<{width}}  {r.status:<9} {r.detail}" for r in results)
