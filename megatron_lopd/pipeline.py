"""The consistent-teacher pipeline, defined once: stages with declared inputs and outputs.

    teacher --generate--> sft_data --train(sft)--> sft (R, + HF export) --generate(R)--> rollouts
      --score(teacher)--> store --train(lightning)--> train --convert to-hf--> export --eval--> eval

`PipelineConfig` has ONE teacher path; `build_stages` hands that very object to the
SFT-data stage and to the scoring stage, so the model that writes the SFT data is the
model that scores the rollouts by construction (DESIGN section 4; the trainer checks it
again from the artifacts' manifests).

Every stage runs `lopd` subcommands (torchrun for multi-process training) in its own
environment (`StageEnv`: a venv, a python, a container image for SLURM) and has an
`is_done()` check that verifies its output. A verified output is done only if what it records
about its making (model / prompt / data fingerprints, sampling, scoring and training settings)
matches what the config asks now; otherwise it is stale, and so is everything downstream of it
(`plan`, `status`). Done stages are skipped, so a rerun continues where it stopped; stale ones
are refused, or with `rerun_stale` moved to `<dir>.stale-<time>` and made again. The same stages are run by `run_local` (plain
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
from megatron_lopd.provenance import cached_model_fingerprint, verify_hf_export
from megatron_lopd.training.run_dir import verify_finished_run, verify_run_export

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
    from megatron_lopd.artifacts import RolloutArtifact

    artifact = RolloutArtifact.open(path, verify=True)
    return f"{len(artifact)} records"


def verify_store(path: Path) -> str:
    from megatron_lopd.store import require_valid_store

    report = require_valid_store(path)
    return f"{report.shards_checked} shards, {report.tokens_checked} tokens checked"


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
    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.generation.base import inspect_model_dir
    from megatron_lopd.provenance import check_teacher_consistency, tokenizer_fingerprint

    art = RolloutArtifact.open(rollouts, verify=True)
    if art.kind != "rollouts":
        raise ArtifactError(f"{rollouts}: is a {art.kind!r} artifact, expected 'rollouts'", "score the rollouts of the SFT model (lopd generate --record-logprobs)")
    inspect_model_dir(teacher)
    teacher_fp = cached_model_fingerprint(teacher)
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


# --------------------------------------------------------------------------- staleness
# A verified output is "done" only if what it records about its making (model fingerprints,
# prompt / data fingerprints, sampling and training settings; DESIGN section 4) matches what the
# config asks now. Each function below returns one "field: recorded X, now Y" line per difference.
_FINGERPRINTS: dict[tuple, str] = {}


def eval_data_fingerprint(path: str | Path) -> str:
    """What `lopd eval` records as data_fingerprint."""
    from megatron_lopd.evaluation.evaluate import load_problems, problems_fingerprint

    path = Path(path).resolve()
    st = path.stat()
    key = ("eval", str(path), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = problems_fingerprint(load_problems(path))
    return _FINGERPRINTS[key]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _differs(out: list[str], name: str, recorded: Any, now: Any, note: str = "") -> None:
    """Append a difference line unless equal (1 == 1.0; a value the output did not record is not compared)."""
    if recorded is None and now is not None and name.endswith("_fingerprint"):
        out.append(f"{name}: not recorded, now {_short(now)}{note}")
    elif recorded != now:
        out.append(f"{name}: recorded {_short(recorded)}, now {_short(now)}{note}")


def _now_or_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LopdError as exc:
        return f"<unreadable: {exc.what}>"
    except OSError as exc:
        return f"<unreadable: {exc}>"


def _rollout_manifest(path: Path):
    from megatron_lopd.artifacts import RolloutArtifact

    return RolloutArtifact.open(path, verify=False)


def _run_manifest(path: Path):
    from megatron_lopd.provenance import Manifest

    return Manifest.read(path, kind="run")


def _recorded(fn: Callable[[], Any]) -> Any:
    """A recorded value of an upstream output, or None when that output is missing or unreadable
    (then its stage is not done, and `plan` marks this one stale for that reason)."""
    try:
        return fn()
    except Exception:  # a half-written artifact can break a reader in any way
        return None


def generation_differences(out: Path, section: str, model_field: str, model_fp: Callable[[], Optional[str]],
                           prompts: str, s: GenerateSettings, model_note: str = "") -> list[str]:
    """`lopd generate` output (SFT data or rollouts) against the model, prompts and settings asked now."""
    from megatron_lopd.generation.prompts import prompt_file_fingerprint

    art = _rollout_manifest(out)
    m = art.manifest
    diffs: list[str] = []
    model = model_fp()
    if model is not None:
        _differs(diffs, model_field, art.generator_fingerprint, model, model_note)
    _differs(diffs, "prompts", m.inputs.get("prompts_fingerprint"), _now_or_error(lambda: prompt_file_fingerprint(prompts)), f" ({prompts})")
    for key in ("n", "temperature", "top_p", "max_tokens", "seed"):
        _differs(diffs, f"{section}.{key}", m.params.get(key), getattr(s, key))
    _differs(diffs, f"{section}.thinking", m.params.get("thinking"), None if s.thinking is None else s.thinking == "on")
    _differs(diffs, f"{section}.backend", m.producer.get("backend"), s.backend)
    _differs(diffs, f"{section}.dtype", m.producer.get("dtype"), s.dtype)
    return diffs


def score_differences(store: Path, teacher: Path, rollouts: Path, s: ScoreSettings) -> list[str]:
    """The teacher store against the teacher, the rollouts and the scoring settings asked now."""
    from megatron_lopd.store.writer import read_meta

    meta = read_meta(store)
    prov = meta.provenance
    diffs: list[str] = []
    _differs(diffs, "teacher", prov.teacher_fingerprint, _now_or_error(lambda: cached_model_fingerprint(teacher)), f" ({teacher})")
    current = _recorded(lambda: _rollout_manifest(rollouts).fingerprint)
    if current is not None:
        _differs(diffs, "rollouts_fingerprint", prov.rollouts_fingerprint, current)
    _differs(diffs, "score.top_k", meta.top_k, s.top_k)
    _differs(diffs, "score.backend", prov.engine, s.backend)
    _differs(diffs, "score.dtype", prov.extra.get("scoring_dtype"), s.dtype)
    return diffs


def training_differences(run_dir: Path, section: str, config: str, overrides: Sequence[str],
                         inputs: dict[str, Callable[[], Optional[str]]]) -> list[str]:
    """A training run's manifest against the trainer config the pipeline would run now (the preset
    plus overrides, resolved as `lopd train` does) and the fingerprints of its inputs. The paths
    the pipeline sets are not compared (a copied work dir is not stale): their content is, by
    fingerprint."""
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.run_dir import flatten_config

    manifest = _run_manifest(run_dir)
    diffs: list[str] = []
    for key, now in inputs.items():
        value = now()
        if value is not None:
            _differs(diffs, key, manifest.inputs.get(key), value)
    try:
        wanted = flatten_config(resolve_config(config, list(overrides)).to_dict())
    except LopdError as exc:
        return diffs + [f"{section}: the trainer config does not resolve now ({exc.what})"]
    recorded = flatten_config(manifest.params)
    changed = [k for k in wanted if k in recorded and recorded[k] != wanted[k] and k not in _PIPELINE_PATH_KEYS]  # keys a newer trainer added: not compared
    for key in changed[:3]:
        diffs.append(f"{section} {key}: recorded {_short(recorded[key])}, now {_short(wanted[key])}")
    if len(changed) > 3:
        diffs.append(f"(+{len(changed) - 3} more {section} settings)")
    return diffs


# trainer keys whose values are pipeline paths (build_stages' `_train_overrides(..., paths)`)
_PIPELINE_PATH_KEYS = frozenset({"model.start_from", "data.store", "data.sft_data", "run_dir"})


def _timestamp(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()  # Manifest / store format
    except ValueError:
        return None


# Manifests' timestamps come from different nodes' clocks: allow this much skew.
_CLOCK_SKEW_S = 120.0


def _made_before(diffs: list[str], what: str, consumer_made: Optional[str], producer_made: Optional[str], producer: str) -> None:
    """An input without a recorded content fingerprint: the output must be younger than the input
    (an input rewritten after the output was made means the output is stale)."""
    c, p = _timestamp(consumer_made), _timestamp(producer_made)
    if c is not None and p is not None and p > c + _CLOCK_SKEW_S:
        diffs.append(f"{what}: {producer} was rewritten ({producer_made}) after this output was made ({consumer_made})")


def opd_differences(run_dir: Path, config: str, overrides: Sequence[str], p: "ArtifactPaths") -> list[str]:
    """The OPD run: the trainer settings, its start checkpoint (R), the store's teacher and rollouts
    and which scoring of them (the store's finalization time), the SFT data's generator."""
    from megatron_lopd.store.writer import read_meta

    store = _recorded(lambda: read_meta(p.store))
    return training_differences(run_dir, "trainer", config, overrides, {
        "start_fingerprint": lambda: _recorded(lambda: _run_manifest(p.sft_run).extra.get("hf_fingerprint")),
        "teacher_fingerprint": lambda: store.provenance.teacher_fingerprint if store else None,
        "rollouts_fingerprint": lambda: store.provenance.rollouts_fingerprint if store else None,
        "store_finalized_at": lambda: store.finalized_at if store else None,
        "sft_data_generator": lambda: _recorded(lambda: _rollout_manifest(p.sft_data).generator_fingerprint),
    })


def export_differences(hf_dir: Path, opd_run: Path) -> list[str]:
    """The HF export: of the OPD run's newest checkpoint, made after that run finished."""
    from megatron_lopd.provenance import Manifest
    from megatron_lopd.training.checkpointing import find_latest

    manifest = Manifest.read(hf_dir, kind="hf_export")
    diffs: list[str] = []
    latest = _recorded(lambda: find_latest(opd_run / "checkpoints"))
    if latest is not None:
        recorded = manifest.inputs.get("checkpoint")  # by name: a copied work dir is not stale
        _differs(diffs, "checkpoint", Path(recorded).name if recorded else None, Path(latest).name)
    run = _recorded(lambda: _run_manifest(opd_run))
    if run is not None:
        _differs(diffs, "run_inputs", manifest.inputs.get("run_inputs"), run.inputs)
        _made_before(diffs, "opd_run", manifest.created_at, run.created_at, f"the run {opd_run}")
    return diffs


def eval_differences(out: Path, student: Path, data: str, e: EvalSettings) -> list[str]:
    from megatron_lopd.evaluation.evaluate import read_results
    from megatron_lopd.provenance import Manifest

    _records, summary = read_results(out)
    diffs: list[str] = []
    exported = _recorded(lambda: Manifest.read(student, kind="hf_export").fingerprint)
    if exported is not None:
        _differs(diffs, "model_fingerprint", summary.model_fingerprint, exported)
    _differs(diffs, "eval_data", summary.data_fingerprint, _now_or_error(lambda: eval_data_fingerprint(data)), f" ({data})")
    for key in ("samples_per_problem", "max_tokens", "temperature", "top_p"):
        _differs(diffs, f"eval.{key}", summary.config.get(key), getattr(e, key))
    _differs(diffs, "eval.backend", summary.backend or summary.config.get("backend"), e.backend)
    return diffs


def owned_hf_export(path: Path) -> bool:
    """True if ``path`` holds only what `lopd convert to-hf` writes (weight shards, config, index,
    tokenizer and generation files, its manifest): a partial export may be cleared for a rerun.
    A subdirectory, any other kind of file or another artifact's manifest proves it is not one."""
    from megatron_lopd.provenance import MANIFEST_NAME, Manifest
    from megatron_lopd.runtime.files import LOCK_NAME

    entries = [e for e in path.iterdir() if e.name != LOCK_NAME]
    if any(not e.is_file() or e.is_symlink() or e.suffix not in _HF_EXPORT_SUFFIXES for e in entries):
        return False
    if (path / MANIFEST_NAME).is_file():
        try:
            Manifest.read(path, kind="hf_export")
        except LopdError:
            return False
    return any(e.suffix == ".safetensors" or e.name in ("config.json", MANIFEST_NAME) for e in entries)


_HF_EXPORT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tmp")


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
    # for a verified output: how its recorded inputs and settings differ from what the config asks
    # now, one "field: recorded X, now Y" line each (empty: up to date). See `plan`.
    provenance: Optional[Callable[[], list[str]]] = None
    # a partial output may be deleted before a rerun only if this proves it is the stage's own artifact
    owns: Optional[Callable[[Path], bool]] = None

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
        provenance=lambda: generation_differences(p.sft_data, "sft_data", "teacher", lambda: _now_or_error(lambda: cached_model_fingerprint(teacher)),
                                                  config.sft_prompts, config.sft_data, f" ({teacher})"),
    )
    sft = Stage(
        "sft",
        inputs={"base_student": base, "sft_data": p.sft_data},
        outputs={"sft_model": p.sft_model, "sft_run": p.sft_run},
        steps=(Step(("train", "--config", config.sft.config, *sft_overrides), nproc_per_node=config.sft.nproc_per_node, nnodes=config.sft.nnodes),),
        verify=verify_run_export,
        env=config.env_for("sft"),
        producers={"sft_data": "sft_data"},
        provenance=lambda: training_differences(p.sft_run, "sft", config.sft.config, sft_overrides, {
            "start_fingerprint": lambda: _now_or_error(lambda: cached_model_fingerprint(base)),
            "sft_data_fingerprint": lambda: _recorded(lambda: _rollout_manifest(p.sft_data).fingerprint),
        }),
    )
    rollouts = Stage(
        "rollouts",
        inputs={"sft_model": p.sft_model, "prompts": Path(config.opd_prompts)},
        outputs={"rollouts": p.rollouts},
        steps=(Step(_generate_args(p.sft_model, config.opd_prompts, p.rollouts, config.rollouts, "rollouts"), shards=config.rollouts.shards),),
        verify=verify_rollouts,
        env=config.env_for("rollouts"),
        producers={"sft_model": "sft"},
        provenance=lambda: generation_differences(p.rollouts, "rollouts", "sft_model", lambda: _recorded(lambda: _run_manifest(p.sft_run).extra.get("hf_fingerprint")),
                                                  config.opd_prompts, config.rollouts),
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
        provenance=lambda: score_differences(p.store, teacher, p.rollouts, config.score),
    )
    train = Stage(
        "train",
        inputs={"sft_model": p.sft_model, "store": p.store, "sft_data": p.sft_data},
        outputs={"opd_run": p.opd_run},
        steps=(Step(("train", "--config", config.trainer.config, *opd_overrides), nproc_per_node=config.trainer.nproc_per_node, nnodes=config.trainer.nnodes),),
        verify=verify_finished_run,
        env=config.env_for("train"),
        producers={"sft_model": "sft", "store": "score", "sft_data": "sft_data"},
        precheck=lambda: _precheck_training(config.trainer, opd_overrides, [sft_data, sft, score]),
        provenance=lambda: opd_differences(p.opd_run, config.trainer.config, opd_overrides, p),
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
        owns=owned_hf_export,
        provenance=lambda: export_differences(p.student_model, p.opd_run),
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
                provenance=lambda: eval_differences(p.eval, p.student_model, str(config.eval_data), e),
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


@dataclass
class StageState:
    """A stage's output now: "done" (verifies and matches the config), "stale" (verifies, but was
    made from other inputs or settings; `reasons` says which) or "pending" (missing or broken)."""

    name: str
    status: str
    detail: str = ""
    reasons: list[str] = field(default_factory=list)


def stage_state(stage: Stage, producers: dict[str, StageState]) -> StageState:
    """Verify the output, then compare its recorded provenance with the config. A stage whose
    producer is stale, or must run again, is stale too: its output was made from what gets replaced."""
    try:
        detail = stage.check()
    except LopdError as exc:
        return StageState(stage.name, "pending", exc.what)
    except Exception as exc:  # a half-written artifact can break a reader in any way
        return StageState(stage.name, "pending", f"{type(exc).__name__}: {exc}")
    reasons = []
    upstream = {p: producers[p].status for p in dict.fromkeys(stage.producers.values()) if p in producers}
    stale = [p for p, st in upstream.items() if st == "stale"]
    pending = [p for p, st in upstream.items() if st == "pending"]
    if stale:
        reasons.append(f"upstream {'stage' if len(stale) == 1 else 'stages'} {', '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale")
    if pending:
        reasons.append(f"its input from {', '.join(pending)} is not done (it will be remade)")
    if stage.provenance is not None:
        try:
            reasons += stage.provenance()
        except LopdError as exc:
            reasons.append(f"its provenance cannot be read: {exc.what}")
        except Exception as exc:
            reasons.append(f"its provenance cannot be read: {type(exc).__name__}: {exc}")
    if reasons:
        return StageState(stage.name, "stale", detail, list(dict.fromkeys(reasons)))
    return StageState(stage.name, "done", detail)


def stage_states(stages: list[Stage], names: Optional[set[str]] = None) -> dict[str, StageState]:
    """States of the named stages (default: all) and of every stage upstream of them, in order."""
    by_name = {s.name: s for s in stages}
    wanted = set(by_name) if names is None else set(names)
    for stage in reversed(stages):  # add the producers' producers
        if stage.name in wanted:
            wanted.update(stage.producers.values())
    states: dict[str, StageState] = {}
    for stage in stages:
        if stage.name in wanted:
            states[stage.name] = stage_state(stage, states)
    return states


def downstream(stages: list[Stage], names: set[str]) -> set[str]:
    """The named stages and every stage that consumes their outputs, directly or not."""
    out = set(names)
    for stage in stages:
        if set(stage.producers.values()) & out:
            out.add(stage.name)
    return out


class StaleError(ConfigError):
    """Finished outputs were made from other inputs or settings than the config asks now.
    `lines`: one line per stale stage with its differences."""

    def __init__(self, what: str, fix: str | None = None, states: Optional[dict[str, "StageState"]] = None):
        super().__init__(what, fix)
        self.lines = [f"  {n}: {'; '.join(st.reasons)}" for n, st in (states or {}).items() if st.status == "stale"]


@dataclass
class Plan:
    """What a run does: `todo` the selected stages to run (pending, or stale with --rerun-stale),
    `states` each stage's state, `stale` the stale outputs a rerun sets aside first."""

    todo: list[Stage]
    states: dict[str, StageState]
    stale: list[Stage]

    def stale_lines(self) -> list[str]:
        return [f"  {s.name}: stale: {'; '.join(self.states[s.name].reasons)}" for s in self.stale]


def plan(stages: list[Stage], selected: list[Stage], *, rerun_stale: bool = False) -> Plan:
    """Before anything runs or waits in a queue: external inputs exist, every input produced by a
    stage outside this run is done (verifies and matches the config), no selected output is stale
    (or, with `rerun_stale`, every stale output and all that depends on it is part of this run), and
    the consistency checks of the inputs that stay pass. Raises a LopdError; nothing is changed."""
    running = {s.name for s in selected}
    for stage in selected:
        for key, path in stage.inputs.items():
            if stage.producers.get(key) is None and not path.exists():
                raise ArtifactError(f"stage {stage.name}: input {key} {path} does not exist", f"fix the {key} path in the pipeline config")
    names = downstream(stages, running) if rerun_stale else running
    states = stage_states(stages, names)
    for stage in selected:
        for key, path in stage.inputs.items():
            producer = stage.producers.get(key)
            if producer is None or producer in running:
                continue
            state = states[producer]
            if state.status == "pending":
                raise ArtifactError(
                    f"stage {stage.name} needs {key} ({path}) from stage {producer}, which is not done: {state.detail}",
                    f"run stage {producer} first (or the whole pipeline)",
                )
            if state.status == "stale":
                raise StaleError(
                    f"stage {stage.name} needs {key} ({path}) from stage {producer}, which is stale: {'; '.join(state.reasons)}",
                    f"rerun stage {producer} too (--stages {producer},{stage.name} --rerun-stale), or restore the config it was made with",
                    states,
                )
    stale = [s for s in stages if states.get(s.name) is not None and states[s.name].status == "stale"]
    if stale and not rerun_stale:
        selected_stale = [s for s in stale if s.name in running]
        if selected_stale:
            first = selected_stale[0]
            raise StaleError(
                f"{len(selected_stale)} stage(s) are stale ({', '.join(s.name for s in selected_stale)}): their outputs were made "
                f"from other inputs or settings than this config asks; {first.name}: {'; '.join(states[first.name].reasons)}",
                "`lopd pipeline status` lists every difference; rerun them with --rerun-stale (each stale output is moved "
                "to <dir>.stale-<time>, nothing is deleted), restore the old config, or use another work_dir",
                states,
            )
        stale = []
    outside = [s.name for s in stale if s.name not in running]
    if outside:
        raise StaleError(
            f"rerunning {', '.join(s.name for s in stale if s.name in running)} makes the finished outputs of "
            f"{', '.join(outside)} stale, which are not selected",
            "select them too (or all stages), so that each output matches its inputs",
            states,
        )
    todo = [s for s in selected if states[s.name].status != "done"]
    rerun = {s.name for s in stale}
    for stage in todo:
        upstream = _upstream(stages, stage)
        if stage.precheck is not None and not (upstream & rerun):  # inputs that are remade are checked when they are
            stage.precheck()
    return Plan(todo, states, stale)


def _upstream(stages: list[Stage], stage: Stage) -> set[str]:
    by_name = {s.name: s for s in stages}
    out: set[str] = set()
    todo = list(stage.producers.values())
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += list(by_name[name].producers.values())
    return out


def check_inputs(stages: list[Stage], selected: list[Stage], *, rerun_stale: bool = False) -> list[Stage]:
    """`plan(...)`'s stages to run: the selected stages that are not done."""
    return plan(stages, selected, rerun_stale=rerun_stale).todo


def set_aside(stages: Sequence[Stage], echo: Callable[[str], None] = print) -> list[Path]:
    """Move each stale stage's output directory to `<dir>.stale-<time>` (a rerun starts clean;
    nothing is deleted). Returns the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for stage in stages:
        paths = list(stage.outputs.values())
        roots = [q for q in paths if not any(q != r and r in q.parents for r in paths)]
        for path in roots:
            if not path.exists() and not path.is_symlink():
                continue
            target = path.with_name(f"{path.name}.stale-{stamp}")
            n = 1
            while target.exists():
                target, n = path.with_name(f"{path.name}.stale-{stamp}.{n}"), n + 1
            path.rename(target)
            echo(f"[pipeline] {stage.name}: stale output moved to {target}")
            moved.append(target)
    return moved


def check_teacher_wrote_sft_data(teacher: Path, sft_data: Path) -> None:
    """Finished SFT data is skipped on a rerun: if the config's teacher changed since, scoring with
    it would break teacher consistency. Compare content fingerprints before anything runs."""
    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.provenance import check_teacher_consistency

    try:
        generator = RolloutArtifact.open(sft_data, verify=False).generator_fingerprint
    except LopdError:
        return  # not written yet: this run writes it with this teacher
    check_teacher_consistency(store_teacher=cached_model_fingerprint(teacher), sft_data_generator=generator,
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
    status: str  # "done" (ran now / verifies), "skipped" (already done), "failed", "cancelled"; status(): "stale", "pending"
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
        from megatron_lopd.runtime.files import remove_owned_dir

        if stage.owns is None:
            raise ArtifactError(f"stage {stage.name}: {stage.output} exists and is not a finished output", f"move it away, then rerun stage {stage.name}")
        echo(f"[pipeline] {stage.name}: removing the unfinished output {stage.output}")
        remove_owned_dir(stage.output, stage.owns, "partial HF export", flag=f"stage {stage.name}")
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


def run_local(config: PipelineConfig, stages: Sequence[str] | str | None = None, *, log_dir: Path | None = None,
              echo: Callable[[str], None] = print, rerun_stale: bool = False) -> list[StageResult]:
    """Run the selected stages (default: all) in order as subprocesses, skipping finished ones.

    A finished output made from other inputs or settings than `config` asks (stale) is refused,
    or with `rerun_stale` moved aside and made again with everything downstream of it. The
    config is recorded in `<work_dir>/pipeline.json` only once these checks passed.

    Stops at the first failure: later stages are reported "cancelled" and `StageFailed`
    is raised after the summary is printed.
    """
    config = config.absolute()
    all_stages = build_stages(config)
    selected = select_stages(all_stages, stages)
    try:
        todo = plan(all_stages, selected, rerun_stale=rerun_stale)
    except StaleError as exc:
        echo("[pipeline] stale outputs (what they record vs what this config asks):\n" + "\n".join(exc.lines))
        raise
    set_aside(todo.stale, echo)
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
    """Each stage: "done" (output verifies and matches the config), "stale" (verifies, but its
    recorded inputs or settings differ from the config: the differences) or "pending" (why)."""
    config = config.absolute()
    out = []
    for name, state in stage_states(build_stages(config)).items():
        detail = "; ".join(state.reasons) if state.status == "stale" else state.detail
        out.append(StageResult(name, state.status, detail))
    return out


def format_results(results: Sequence[StageResult]) -> str:
    width = max((len(r.name) for r in results), default=5)
    return "\n".join(f"  {r.name:<{width}}  {r.status:<9} {r.detail}" for r in results)
