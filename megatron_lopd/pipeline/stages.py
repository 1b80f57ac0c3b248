"""The stage graph: what each stage reads, writes and runs, and how its output is verified
(the picture is in the package docstring). `build_stages` hands ONE teacher path object to the
SFT-data stage and to the scoring stage: consistency by construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.pipeline.checks import check_teacher_wrote_sft_data, check_training_inputs, owned_hf_export, verify_eval, verify_rollouts, verify_store
from megatron_lopd.pipeline.config import EngineSettings, GenerateSettings, PipelineConfig, ScoreSettings, StageEnv, TrainSettings
from megatron_lopd.pipeline.launch import EngineLayout, Step, lopd_command, torchrun_command
from megatron_lopd.pipeline.staleness import (eval_differences, export_differences, generation_differences, model_now, opd_differences,
                                              recorded_artifact, recorded_export, score_differences, training_differences)
from megatron_lopd.provenance import verify_hf_export
from megatron_lopd.training.run_dir import verify_finished_run, verify_run_export

STAGE_NAMES = ("sft_data", "sft", "rollouts", "score", "train", "export", "eval")


class ArtifactPaths:
    """Where each stage writes, under the pipeline's work dir."""

    def __init__(self, work_dir: Path):
        self.work_dir, self.sft_data, self.sft_run = work_dir, work_dir / "sft_data", work_dir / "sft"
        self.sft_model = self.sft_run / "hf"  # R in Hugging Face format (the trainer's export): rollout policy, OPD's start
        self.rollouts, self.store, self.opd_run = work_dir / "rollouts", work_dir / "teacher_store", work_dir / "opd"
        self.student_model, self.eval = work_dir / "student_hf", work_dir / "eval"


@dataclass
class StageState:
    """A stage's output now: "done" (verifies and matches the config), "stale" (verifies, but was
    made from other inputs or settings; `reasons` says which) or "pending" (missing or broken)."""

    name: str
    status: str
    detail: str = ""
    reasons: list[str] = field(default_factory=list)


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
    # checks of the inputs that already exist, before the stage is run or queued (consistency);
    # given this invocation's stage states, so that no input is verified twice
    precheck: Optional[Callable[[Mapping[str, StageState]], None]] = None
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

    def verify_output(self) -> tuple[bool, str]:
        """(True, the verification line), or (False, why not) for a missing or broken output."""
        try:
            return True, self.check()
        except LopdError as exc:
            return False, exc.what
        except Exception as exc:  # a half-written artifact can break a reader in any way: not done
            return False, f"{type(exc).__name__}: {exc}"

    def uses_torchrun(self) -> bool:
        return any(s.nproc_per_node > 1 or s.nnodes > 1 for s in self.steps)

    @property
    def nnodes(self) -> int:
        return max(s.engines.nodes if s.engines else s.nnodes for s in self.steps)

    def waves(self, node_rank: int = 0, gpus: Sequence[str] = ()) -> list[list[tuple[Step, list[str], dict[str, str]]]]:
        """(step, `lopd` arguments, environment) of every process this stage starts on one node (with
        `gpus`, as CUDA_VISIBLE_DEVICES names them), in waves: the processes of a wave run side by
        side (the engines of an engine step), the waves one after another. The shard of each
        engine is explicit, never guessed from the launcher's environment."""
        out, total = [], 0
        for step in self.steps:
            args = [str(a) for a in step.args]
            if step.engines is None:
                if not (step.only_after_several_engines and total == 1):
                    out.append([(step, args, {})])
                continue
            per_node = step.engines.engines_on(len(gpus))
            total = per_node * step.engines.nodes
            out.append([(step, [*args, f"--shard={node_rank * per_node + j}/{total}"], step.engines.devices(gpus, j))
                        for j in range(per_node)])
        return out

    def invocations(self, node_rank: int = 0, gpus: Sequence[str] = ()) -> list[tuple[Step, list[str]]]:
        """(step, `lopd` arguments) of every process this stage starts on one node, in order."""
        return [(step, args) for wave in self.waves(node_rank, gpus) for step, args, _env in wave]

    def commands(self, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 gpus: Sequence[str] = ()) -> list[list[str]]:
        """The argv of every process this stage starts on one node, in order."""
        return [argv for wave in self.launches(node_rank, master_addr, master_port, gpus) for argv, _env in wave]

    def launches(self, node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 gpus: Sequence[str] = ()) -> list[list[tuple[list[str], dict[str, str]]]]:
        """`waves` as (argv, environment): torchrun for multi-process steps, the stage's `lopd` otherwise."""
        lopd, python = lopd_command(self.env)
        return [[(torchrun_command(python, lopd, args, step, node_rank, master_addr, master_port) if step.nproc_per_node > 1 or step.nnodes > 1
                  else [*lopd, *args], env) for step, args, env in wave] for wave in self.waves(node_rank, gpus)]


def build_stages(config: PipelineConfig) -> list[Stage]:
    """The stage graph. The teacher path is one object, handed to `sft_data` and `score`."""
    config.validate()
    p = ArtifactPaths(Path(config.work_dir))
    teacher = Path(config.teacher)  # ONE object for both teacher stages: consistency by construction
    base = Path(config.base_student)
    sft_overrides = train_overrides(config.sft, {
        "model.start_from": base, "data.sft_data": p.sft_data, "run_dir": p.sft_run, "checkpoint.export_hf": True})
    opd_overrides = train_overrides(config.trainer, {
        "model.start_from": p.sft_model, "data.store": p.store, "data.sft_data": p.sft_data, "run_dir": p.opd_run,
        "checkpoint.export_hf": False})
    sft_data = Stage(
        "sft_data",
        inputs={"teacher": teacher, "prompts": Path(config.sft_prompts)},
        outputs={"sft_data": p.sft_data},
        steps=(Step(_generate_args(teacher, config.sft_prompts, p.sft_data, config.sft_data, "sft_data"), engines=_engines(config.sft_data)),),
        verify=verify_rollouts,
        env=config.envs.resolve("sft_data"),
        provenance=lambda: generation_differences(p.sft_data, "sft_data", "teacher", lambda: model_now(teacher),
                                                  config.sft_prompts, config.sft_data, f" ({teacher})"),
    )
    sft = Stage(
        "sft",
        inputs={"base_student": base, "sft_data": p.sft_data},
        outputs={"sft_model": p.sft_model, "sft_run": p.sft_run},
        steps=(Step(("train", "--config", config.sft.config, *sft_overrides), nproc_per_node=config.sft.nproc_per_node, nnodes=config.sft.nnodes),),
        verify=verify_run_export,
        env=config.envs.resolve("sft"),
        producers={"sft_data": "sft_data"},
        provenance=lambda: training_differences(p.sft_run, "sft", config.sft.config, sft_overrides, {
            "start_fingerprint": lambda: model_now(base),
            "sft_data_fingerprint": lambda: recorded_artifact(p.sft_data),
        }),
    )
    rollouts = Stage(
        "rollouts",
        inputs={"sft_model": p.sft_model, "prompts": Path(config.opd_prompts)},
        outputs={"rollouts": p.rollouts},
        steps=(Step(_generate_args(p.sft_model, config.opd_prompts, p.rollouts, config.rollouts, "rollouts"), engines=_engines(config.rollouts)),),
        verify=verify_rollouts,
        env=config.envs.resolve("rollouts"),
        producers={"sft_model": "sft"},
        provenance=lambda: generation_differences(p.rollouts, "rollouts", "sft_model", lambda: recorded_export(p.sft_run),
                                                  config.opd_prompts, config.rollouts),
    )
    score = Stage(
        "score",
        inputs={"teacher": teacher, "rollouts": p.rollouts},
        outputs={"store": p.store},
        steps=_score_steps(teacher, p, config.score),
        verify=verify_store,
        env=config.envs.resolve("score"),
        producers={"rollouts": "rollouts"},
        precheck=lambda _states: check_teacher_wrote_sft_data(teacher, p.sft_data),
        provenance=lambda: score_differences(p.store, teacher, p.rollouts, config.score),
    )
    train = Stage(
        "train",
        inputs={"sft_model": p.sft_model, "store": p.store, "sft_data": p.sft_data},
        outputs={"opd_run": p.opd_run},
        steps=(Step(("train", "--config", config.trainer.config, *opd_overrides), nproc_per_node=config.trainer.nproc_per_node, nnodes=config.trainer.nnodes),),
        verify=verify_finished_run,
        env=config.envs.resolve("train"),
        producers={"sft_model": "sft", "store": "score", "sft_data": "sft_data"},
        precheck=lambda states: _precheck_training(config.trainer, opd_overrides, ("sft_data", "sft", "score"), p.store, states),
        provenance=lambda: opd_differences(p.opd_run, config.trainer.config, opd_overrides, p.store, p.sft_run, p.sft_data),
    )
    export = Stage(
        "export",
        inputs={"opd_run": p.opd_run},
        outputs={"student_model": p.student_model},
        # A run directory: the newest checkpoint is exported, with the run's provenance.
        steps=(Step(("convert", "to-hf", "--checkpoint", str(p.opd_run), "--out", str(p.student_model))),),
        verify=verify_hf_export,
        env=config.envs.resolve("export"),
        producers={"opd_run": "train"},
        fresh_output=True,
        owns=owned_hf_export,
        provenance=lambda: export_differences(p.student_model, p.opd_run),
    )
    stages = [sft_data, sft, rollouts, score, train, export]
    if config.eval.suite:
        stages.append(_suite_stage(config, p))
    elif config.eval_data:
        e = config.eval
        stages.append(
            Stage(
                "eval",
                inputs={"student_model": p.student_model, "data": Path(config.eval_data)},
                outputs={"eval": p.eval},
                # The last engine to finish merges the shards' results.
                steps=(Step(("eval", "--model", str(p.student_model), "--data", str(config.eval_data), "--out", str(p.eval),
                             "--samples-per-problem", str(e.samples_per_problem), "--max-tokens", str(e.max_tokens),
                             "--temperature", str(e.temperature), "--top-p", str(e.top_p), *e.engine_args(), "--no-progress",
                             *e.extra_args), engines=_engines(e)),),
                verify=verify_eval,
                env=config.envs.resolve("eval"),
                producers={"student_model": "export"},
                provenance=lambda: eval_differences(p.eval, p.student_model, str(config.eval_data), e),
            )
        )
    return stages


def _suite_stage(config: PipelineConfig, p: ArtifactPaths) -> Stage:
    """The eval stage of a suite: every benchmark into `eval/NAME/`, the table in `eval/suite.md`.
    Its output is done when the table lists every benchmark with data as done, and stale when a
    benchmark's recorded model, data or settings differ from what the config asks now."""
    from megatron_lopd.evaluation.suite import SUITES, suite_differences, verify_suite

    e = config.eval
    run = e.suite_run()  # a bad suite name, file or benchmark name: refused with the config
    inputs = {"student_model": p.student_model, **{f"eval.suite_data.{name}": source.path for name, source in run.data.items()}}
    if e.suite not in SUITES:
        inputs["eval.suite"] = Path(e.suite)
    data = [f"--suite-data={name}={path}" for name, path in e.suite_data.items()]

    def provenance() -> list[str]:
        from megatron_lopd.provenance import Manifest

        try:
            exported = Manifest.read(p.student_model, kind="hf_export").fingerprint
        except Exception:  # a missing or half-written export: the export stage is then not done, and that is reported
            exported = None
        return suite_differences(p.eval, run, exported)

    return Stage(
        "eval",
        inputs=inputs,
        outputs={"eval": p.eval},
        # Every engine evaluates its shard of each benchmark; the last to finish a benchmark merges it.
        steps=(Step(("eval", "--model", str(p.student_model), "--suite", e.suite, *data, "--out", str(p.eval), *e.suite_overrides.eval_args(),
                     *e.engine_args(), "--no-progress", *e.extra_args), engines=_engines(e)),),
        verify=verify_suite,
        env=config.envs.resolve("eval"),
        producers={"student_model": "export"},
        provenance=provenance,
    )


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


def train_overrides(settings: TrainSettings, paths: dict[str, Any]) -> list[str]:
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
            "--seed", str(s.seed), *s.engine_args(), "--no-progress"]
    if s.thinking:
        args += ["--thinking", s.thinking]
    if s.format:
        args += ["--format", s.format]
    if kind == "rollouts":  # R's raw log-prob of each sampled token: the drift monitor's reference
        args.append("--record-logprobs")
    return tuple(args + list(s.extra_args))


def _engines(s: EngineSettings) -> EngineLayout:
    return EngineLayout(tensor_parallel=s.tensor_parallel, per_node=s.engines_per_node, nodes=s.nodes)


def _score_steps(teacher: Path, p: ArtifactPaths, s: ScoreSettings) -> tuple[Step, ...]:
    """The scoring engines, then one `--finalize` after every engine exited (a lone engine
    finalizes the store itself)."""
    score = ("score", "--rollouts", str(p.rollouts), "--teacher", str(teacher), "--out", str(p.store),
             "--top-k", str(s.top_k), *s.engine_args(), "--no-progress", *s.extra_args)
    return (Step(score, engines=_engines(s)), Step(("score", "--out", str(p.store), "--finalize", "--no-progress"), only_after_several_engines=True))


def _precheck_training(settings: TrainSettings, overrides: list[str], needs: Sequence[str], store: Path,
                       states: Mapping[str, StageState]) -> None:
    """The full training check (store, consistency, layout) once every input the trainer reads exists
    (`needs`: their stages). The store was verified when `states` were computed: not again."""
    if all(states[name].status != "pending" for name in needs):
        check_training_inputs(settings.config, overrides, settings.nproc_per_node * settings.nnodes,
                              verified={store: states["score"].detail})


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


def downstream(stages: list[Stage], names: set[str]) -> set[str]:
    """The named stages and every stage that consumes their outputs, directly or not."""
    out = set(names)
    for stage in stages:
        if set(stage.producers.values()) & out:
            out.add(stage.name)
    return out


def upstream(stages: list[Stage], stage: Stage) -> set[str]:
    """Every stage whose output `stage` reads, directly or not."""
    by_name = {s.name: s for s in stages}
    out: set[str] = set()
    todo = list(stage.producers.values())
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += list(by_name[name].producers.values())
    return out
