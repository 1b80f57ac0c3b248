"""nemo-run recipes for the consistent-teacher Lightning OPD pipeline (megatron_lopd.pipeline).

    python -m recipes.lightning_opd --factory qwen3_8b run.executor=slurm \\
        run.executor.account=ACCOUNT run.executor.partition=batch trainer.lr=1e-6 --yes
    python -m recipes.lightning_opd --factory tiny run.executor=local --yes          # CPU
    python -m recipes.lightning_opd --factory qwen3_8b stages=train --dryrun         # one stage

Factories (`--factory`): `qwen3_8b`, `qwen3_4b`, `qwen3_30b_a3b`, `tiny`. Executors
(`run.executor=`): `local` (one task running the selected stages in order; multi-process
training with torchrun) and `slurm` (one job per stage, chained with `afterok`
dependencies; a failed stage cancels the rest). No executor runs the stages in this
process. Every field of the pipeline config can be overridden as `section.key=value`.

The command exits non-zero when a stage fails (nemo-run's own CLI exits 0 then). Before
anything is submitted it checks the inputs (external paths exist, stages that are not
part of this run are done), the SLURM account and partition (`sinfo`) and whether SLURM
can ever schedule each job (`sbatch --test-only`), so bad input fails before it waits in
a queue. A finished output made from other inputs or settings than the config asks (another
teacher, temperature, top_k, trainer override, prompt file...) is stale: refused at submit time,
or with `rerun_stale=true` moved to `<dir>.stale-<time>` and made again with everything
downstream of it. Bad arguments are refused in one line; `--dryrun` never asks to confirm.
"""


import dataclasses
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import nemo_run as run

from megatron_lopd.config import without_none
from megatron_lopd.errors import ConfigError, LopdError
from megatron_lopd.pipeline.memory import check_plans, format_plan, pipeline_plans
from megatron_lopd.pipeline import (
    CONFIG_NAME,
    EvalSettings,
    GenerateSettings,
    PipelineConfig,
    ScoreSettings,
    Stage,
    StageEnvs,
    StageState,
    StaleError,
    TrainSettings,
    build_stages,
    format_results,
    lopd_command,
    plan,
    run_planned,
    select_stages,
    set_aside,
    stage_states,
    state_results,
    visible_gpus,
)

_MODELS = os.environ.get("LOPD_MODELS_DIR", "/models")
_DATA = os.environ.get("LOPD_DATA_DIR", "/data")
_SUCCEEDED = "SUCCEEDED"


# --------------------------------------------------------------------------- executors
@run.cli.factory
@run.autoconvert
def local() -> run.LocalExecutor:
    """Run on this machine: one task that runs the selected stages in order."""
    return run.LocalExecutor(ntasks_per_node=1)


@run.cli.factory
@run.autoconvert
def slurm() -> run.SlurmExecutor:
    """One SLURM job per stage. Set account / partition / gpus_per_node / time / container_image
    with `run.executor.<field>=...` (defaults from LOPD_SLURM_ACCOUNT / LOPD_SLURM_PARTITION)."""
    return run.SlurmExecutor(
        account=os.environ.get("LOPD_SLURM_ACCOUNT", ""),
        partition=os.environ.get("LOPD_SLURM_PARTITION") or None,
        nodes=1,
        ntasks_per_node=1,
        gpus_per_node=8,
        time="24:00:00",
        # LocalTunnel: submit from a node of the cluster. job_dir "" = $NEMORUN_HOME/experiments,
        # which must be the experiment's base dir (or sbatch cannot find the generated script).
        tunnel=run.LocalTunnel(job_dir=""),
        packager=run.Packager(),  # the code is installed in the stage's environment: no git archive
        additional_parameters={"kill_on_invalid_dep": "yes"},  # a failed stage cancels its dependents
    )


# --------------------------------------------------------------------------- the entry point
@run.cli.entrypoint(type="experiment", namespace="lopd", help="the consistent-teacher Lightning OPD pipeline")
def lightning_opd(
    ctx: run.cli.RunContext,
    work_dir: str = "runs/lightning_opd",
    teacher: str = "",
    base_student: str = "",
    sft_prompts: str = "",
    opd_prompts: str = "",
    eval_data: Optional[str] = None,
    sft_data: GenerateSettings = GenerateSettings(),
    sft: TrainSettings = TrainSettings(config="sft"),
    rollouts: GenerateSettings = GenerateSettings(max_tokens=4096),
    score: ScoreSettings = ScoreSettings(),
    trainer: TrainSettings = TrainSettings(),
    eval: EvalSettings = EvalSettings(),
    envs: StageEnvs = StageEnvs(),
    stages: str = "all",
    title: str = "lightning_opd",
    rerun_stale: bool = False,
    gpu_memory_gib: float = 79.2,
) -> None:
    """Run the pipeline (or `stages=a,b`) with `run.executor` (none: in this process).
    `rerun_stale=true`: finished outputs made from other inputs or settings than this config
    asks are moved to `<dir>.stale-<time>` and made again (default: refuse). `gpu_memory_gib`:
    each GPU's memory as CUDA reports it (an "80 GB" H100: 79.2), for the memory plan that
    refuses, before anything is queued, a stage that cannot fit."""
    config = PipelineConfig(
        work_dir=work_dir, teacher=teacher, base_student=base_student, sft_prompts=sft_prompts, opd_prompts=opd_prompts,
        eval_data=eval_data, sft_data=sft_data, sft=sft, rollouts=rollouts, score=score, trainer=trainer, eval=eval, envs=envs,
    )
    executor = getattr(ctx, "executor", None)
    try:
        rc = launch(config, stages, executor, title=title, dryrun=ctx.dryrun, detach=ctx.detach, tail_logs=ctx.tail_logs,
                    rerun_stale=rerun_stale, gpu_memory_gib=gpu_memory_gib)
    except LopdError as exc:
        print(f"lightning_opd: error: {exc}", file=sys.stderr, flush=True)
        rc = exc.exit_code
    sys.stdout.flush()
    if rc:
        sys.exit(rc)  # nemo-run's CLI would exit 0: SystemExit passes through it


def launch(
    config: PipelineConfig,
    stages: str = "all",
    executor: Optional[run.Executor] = None,
    *,
    title: str = "lightning_opd",
    dryrun: bool = False,
    detach: bool = False,
    tail_logs: bool = False,
    rerun_stale: bool = False,
    gpu_memory_gib: float = 79.2,
) -> int:
    """Check everything that can be checked before a queue, then run or submit. Returns the exit code.

    Stale outputs (made from other inputs or settings than `config` asks) are refused here, at
    submit time, or with `rerun_stale` moved aside before the jobs are queued, so that every job
    finds its stage pending. `pipeline.json` is written only after these checks passed. Each
    output is verified once here (`known`), however many checks and reports read its state."""
    config = config.absolute()  # jobs start in their own directories
    all_stages = build_stages(config)
    selected = select_stages(all_stages, stages)
    gpus_per_node = (executor.gpus_per_node or 0) if isinstance(executor, run.SlurmExecutor) else len(visible_gpus())
    if gpus_per_node:  # the memory plan: a stage that cannot fit is refused before anything runs or is queued
        plans = [p for p in pipeline_plans(config, gpus_per_node, gpu_memory_gib) if p.stage in {s.name for s in selected}]
        print("\n".join(f"[lightning_opd] plan: {line}" for line in format_plan(plans)))
        check_plans(plans)
    stale: list[Stage] = []
    known: dict[str, StageState] = {}
    try:
        checked = plan(all_stages, selected, rerun_stale=rerun_stale, known=known)
        pending, stale = checked.todo, checked.stale
    except LopdError as exc:
        if isinstance(exc, StaleError) and exc.lines:
            print("[lightning_opd] stale outputs (what they record vs what this config asks):\n" + "\n".join(exc.lines), flush=True)
        if not dryrun:
            raise
        print(f"[lightning_opd] warning (dry run): {exc}")
        states = stage_states(all_stages, {s.name for s in selected}, known)
        pending = [s for s in selected if states[s.name].status != "done"]
    todo = {s.name for s in pending}
    for s in selected:
        if s.name not in todo:
            print(f"[lightning_opd] {s.name}: already done, skipped")
    if not pending:
        print("[lightning_opd] nothing to do: every selected stage is done")
        return 0
    if stale:
        print(f"[lightning_opd] stale, made again: {', '.join(s.name for s in stale)}" + (" (dry run: nothing is moved)" if dryrun else ""))
    if executor is None:
        if dryrun:
            _print_plan(pending, len(visible_gpus()))
            return 0
        run_planned(config, checked, pending)
        return 0
    if isinstance(executor, run.SlurmExecutor):
        if dryrun:
            _print_plan(pending, executor.gpus_per_node or 0)
        slurm_preflight(executor, pending)
    config_path = Path(config.work_dir) / CONFIG_NAME
    if not dryrun:
        set_aside(stale, print)  # the jobs then find their stages pending
        config.save(config_path)

    with run.Experiment(title, executor=executor, log_level="WARN") as exp:
        if isinstance(executor, run.SlurmExecutor):
            previous = None
            for stage in pending:  # one job per stage, each after the previous one succeeded
                job = exp.add(
                    run.Script(inline=_job_script(stage, config_path)),
                    executor=stage_executor(executor, stage),
                    name=stage.name,
                    dependencies=[previous] if previous else [],
                )
                previous = job
        else:  # one task; `lopd pipeline run` stops at the first failing stage
            names = ",".join(s.name for s in pending)
            exp.add(run.Script(inline=_job_script(pending, config_path)), executor=executor.clone(), name="pipeline")
            print(f"[lightning_opd] stages {names} as one local task")
        if dryrun:
            exp.dryrun(log=True)
            return 0
        exp.run(detach=detach, tail_logs=tail_logs)
    # Leaving the `with` block waits for the jobs (unless detached): only now are the states final.
    return report(config, pending, exp.status(return_dict=True) or {}, detached=detach, known=known)


def report(config: PipelineConfig, pending: list[Stage], tasks: dict[str, dict], *, detached: bool,
           known: Optional[dict[str, StageState]] = None) -> int:
    """Print each task's scheduler state, the failure's error line and log, and whether each
    stage's output verifies. Returns the exit code: non-zero if any task failed or any output
    does not verify. `known`: the states found before the jobs ran (only the jobs' outputs are
    verified again)."""
    states = {name: str(info["status"]) for name, info in tasks.items()}
    print("[lightning_opd] task states: " + ", ".join(f"{k}={v}" for k, v in states.items()))
    if detached:
        print(f"[lightning_opd] detached: `lopd pipeline status --config {Path(config.work_dir) / CONFIG_NAME}` shows progress")
        return 0
    for name, info in tasks.items():
        if states[name] == _SUCCEEDED:
            continue
        logs = sorted(Path(info.get("local_dir", "")).glob("log*.out"))
        lines = logs[-1].read_text(errors="replace").splitlines() if logs else []
        errors = [line for line in lines if "error:" in line] or lines[-1:]
        where = f" (log: {logs[-1]})" if logs else ""
        print(f"[lightning_opd] {name}: {states[name]}{where}" + (f": {errors[0].strip()}" if errors else ""), file=sys.stderr)
    names = [s.name for s in pending]
    before = {n: st for n, st in (known or {}).items() if n not in names}
    verified = {r.name: r for r in state_results(stage_states(build_stages(config), set(names), before))}
    print(format_results([verified[n] for n in names]))
    failed = [k for k, v in states.items() if v != _SUCCEEDED]
    unverified = [n for n in names if verified[n].status != "done"]
    if failed or unverified:
        print(f"[lightning_opd] FAILED: {len(failed)} task(s) not succeeded, {len(unverified)} stage output(s) missing", file=sys.stderr)
        return 1
    print("[lightning_opd] all stages succeeded")
    return 0


def _job_script(stages, config_path: Path) -> str:
    """The job's command: `lopd pipeline run` of the stage(s), in the stage's environment."""
    stages = [stages] if isinstance(stages, Stage) else stages
    env = stages[0].env
    lopd = ["lopd"] if env.container_image and not (env.venv or env.python) else lopd_command(env)[0]
    argv = [*lopd, "pipeline", "run", "--config", str(config_path), "--stages", ",".join(s.name for s in stages)]
    return f"exec {shlex.join(argv)}\n"


def stage_executor(base: run.SlurmExecutor, stage: Stage) -> run.SlurmExecutor:
    """The base executor, resized for the stage (nodes) and put into the stage's container."""
    ex = base.clone()
    ex.nodes = stage.nnodes
    ex.ntasks_per_node = 1  # `lopd pipeline run` per node; it starts torchrun for the ranks
    if stage.env.container_image:
        ex.container_image = stage.env.container_image
    ex.container_mounts = list(ex.container_mounts or []) + list(stage.env.container_mounts)
    ex.additional_parameters = {**(ex.additional_parameters or {}), "kill_on_invalid_dep": "yes"}
    ex.packager = run.Packager()
    return ex


# --------------------------------------------------------------------------- pre-queue checks
def slurm_partitions() -> list[str]:
    if not shutil.which("sinfo"):
        raise ConfigError("`sinfo` not found: no SLURM client on this machine", "submit from a SLURM login node, or use run.executor=local")
    proc = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"`sinfo` failed: {proc.stderr.strip()}", "check that the SLURM controller is reachable")
    return sorted(set(proc.stdout.split()))


def slurm_preflight(executor: run.SlurmExecutor, stages: list[Stage]) -> None:
    """Account set, partition exists, and SLURM can schedule every stage's job (`sbatch --test-only`)."""
    if not executor.account:
        raise ConfigError("SLURM account is not set", "pass run.executor.account=ACCOUNT (or export LOPD_SLURM_ACCOUNT)")
    partitions = slurm_partitions()
    if executor.partition and executor.partition not in partitions:
        raise ConfigError(
            f"SLURM partition {executor.partition!r} does not exist (this cluster has: {', '.join(partitions)})",
            "set run.executor.partition to one of them",
        )
    for stage in stages:
        ex = stage_executor(executor, stage)
        cmd = ["sbatch", "--test-only", f"--account={ex.account}", f"--nodes={ex.nodes}", f"--ntasks-per-node={ex.ntasks_per_node}", f"--time={ex.time}"]
        cmd += [f"--partition={ex.partition}"] if ex.partition else []
        cmd += [f"--gpus-per-node={ex.gpus_per_node}"] if ex.gpus_per_node else []
        cmd += ["--wrap", "true"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise ConfigError(f"SLURM would never run stage {stage.name} ({' '.join(cmd[2:-2])}): {msg}", "fix run.executor (nodes, gpus_per_node, time, partition)")


def _print_plan(stages: list[Stage], gpus_per_node: int) -> None:
    """Every process of node 0 of each stage, with the GPUs each engine is pinned to."""
    gpus = [str(i) for i in range(gpus_per_node)]
    for stage in stages:
        for wave in stage.launches(gpus=gpus):
            for argv, env in wave:
                pinned = "".join(f"{k}={v} " for k, v in env.items())
                print(f"[lightning_opd] {stage.name}: {pinned}{shlex.join(argv)}")


# --------------------------------------------------------------------------- recipes
def pipeline_config(recipe: run.Partial) -> PipelineConfig:
    """The PipelineConfig a recipe (a factory's Partial, after overrides) describes."""
    import fiddle as fdl

    kwargs = dict(fdl.build(recipe).keywords)
    for key in ("ctx", "stages", "title", "rerun_stale"):
        kwargs.pop(key, None)
    return PipelineConfig(**kwargs)


def write_tiny_inputs(out_dir: str) -> Path:
    """Inputs for the `tiny` recipe: two random tiny Qwen3 models with one char tokenizer
    (teacher larger than the student) and small prompt / eval files. Seconds on CPU."""
    import json

    from megatron_lopd.models.tiny import write_random_hf_model
    from megatron_lopd.models.tokenizer import build_char_tokenizer

    out = Path(out_dir)
    tok = build_char_tokenizer()
    write_random_hf_model(out / "teacher", seed=1, tokenizer=tok, hidden_size=96, num_heads=4, num_kv_heads=4)
    write_random_hf_model(out / "student", seed=0, tokenizer=tok)
    rows = {
        "sft_prompts.jsonl": [{"id": f"s{i}", "prompt": f"Add {i} and {i + 3}."} for i in range(8)],
        "opd_prompts.jsonl": [{"id": f"o{i}", "prompt": f"What is {i} times 2?"} for i in range(8)],
        "eval.jsonl": [{"id": f"e{i}", "problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(4)],
    }
    for name, items in rows.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return out


def _paper_pipeline(student: str, teacher: str, work_dir: str, train_nodes: int, *, teacher_tp: int, student_tp: int = 1,
                    **trainer) -> run.Partial:
    """The paper's hyper-parameters (DESIGN section 1) around a student/teacher pair. Engine stages
    fill each 8-GPU node with engines of `teacher_tp` (SFT data, scoring) or `student_tp` GPUs
    (rollouts of R, evaluation); `lopd pipeline plan` shows that each fits an 80 GB GPU."""
    by_teacher, by_student = dict(tensor_parallel=teacher_tp), dict(tensor_parallel=student_tp)
    return run.Partial(
        lightning_opd,
        work_dir=work_dir,
        teacher=f"{_MODELS}/{teacher}",
        base_student=f"{_MODELS}/{student}",
        # The data sets as published (Hugging Face snapshots under $LOPD_DATA_DIR), read by their named formats.
        sft_prompts=f"{_DATA}/OpenThoughts3-1.2M/data",
        opd_prompts=f"{_DATA}/dapo-math-17k/dapo-math-17k.jsonl",
        sft_data=run.Config(GenerateSettings, temperature=0.7, top_p=0.9, max_tokens=16384, format="openthoughts3", **by_teacher),
        sft=run.Config(TrainSettings, config="sft", lr=8e-5, steps=3000, global_batch_size=256, nproc_per_node=8, nnodes=train_nodes, **trainer),
        rollouts=run.Config(GenerateSettings, temperature=0.7, top_p=0.9, max_tokens=4096, format="dapo_math_17k_slime", **by_student),
        score=run.Config(ScoreSettings, top_k=16, **by_teacher),
        trainer=run.Config(TrainSettings, config="lightning_opd", lr=2e-6, steps=150, global_batch_size=256, nproc_per_node=8, nnodes=train_nodes, **trainer),
        # The paper's table: each benchmark with its own sampling (megatron_lopd.evaluation.suite).
        eval=run.Config(EvalSettings, suite="paper", suite_data={
            "aime24": f"{_DATA}/aime_2024/data", "aime25": f"{_DATA}/AIME2025", "hmmt25": f"{_DATA}/hmmt_feb_2025/data",
            "lcb_v5": f"{_DATA}/code_generation_lite", "lcb_v6": f"{_DATA}/code_generation_lite"}, **by_student),
    )


@run.cli.factory(target=lightning_opd)
def qwen3_8b() -> run.Partial:
    """Qwen3-8B-Base student, Qwen3-32B teacher. Training: TP 4 + sequence parallel on 8 GPUs.
    Engines: the teacher at TP 2 (61 GiB of bf16 weights: 30.5 GiB per GPU), 4 per node; the
    8B models at TP 1, 8 per node."""
    return _paper_pipeline("Qwen3-8B-Base", "Qwen3-32B", "runs/qwen3_8b", 1, teacher_tp=2, tensor_parallel=4, sequence_parallel=True)


@run.cli.factory(target=lightning_opd)
def qwen3_4b() -> run.Partial:
    """Qwen3-4B-Base student, Qwen3-8B teacher. Training: TP 2 + sequence parallel on 8 GPUs.
    Engines: every model at TP 1, 8 per node."""
    return _paper_pipeline("Qwen3-4B-Base", "Qwen3-8B", "runs/qwen3_4b", 1, teacher_tp=1, tensor_parallel=2, sequence_parallel=True)


@run.cli.factory(target=lightning_opd)
def qwen3_30b_a3b() -> run.Partial:
    """Qwen3-30B-A3B-Base (MoE) student on one 8-GPU node, as the official MoE run: TP 4 + sequence
    parallel for attention, EP 8 with expert tensor parallel 1 for the experts, the optimizer
    offloaded to the CPU (precision-aware, overlapped copies), full recompute and dynamic batches
    of 12,288 tokens per GPU; teacher Qwen3-30B-A3B-Thinking-2507 (set teacher=DIR for another).
    Engines: both 30B-A3B models (57 GiB of bf16 weights) at TP 2, 4 per node."""
    memory = {"optimizer.cpu_offload": True, "optimizer.precision_aware": True, "model.recompute": "full",
              "data.micro_batch_tokens": 12288}
    return _paper_pipeline("Qwen3-30B-A3B-Base", "Qwen3-30B-A3B-Thinking-2507", "runs/qwen3_30b_a3b", 1, teacher_tp=2, student_tp=2,
                           tensor_parallel=4, expert_parallel=8, sequence_parallel=True, overrides=memory)


@run.cli.factory(target=lightning_opd)
def tiny() -> run.Partial:
    """Tiny random models on CPU: seconds per stage. Inputs under $LOPD_TINY_INPUTS (teacher/,
    student/, sft_prompts.jsonl, opd_prompts.jsonl, eval.jsonl)."""
    inputs = os.environ.get("LOPD_TINY_INPUTS", "runs/tiny_inputs")
    small = dict(n=1, temperature=1.0, top_p=1.0, max_tokens=24, backend="hf", dtype="float32")
    cpu_train = dict(config="tiny_cpu", global_batch_size=4, micro_batch_size=1, save_interval=2)
    return run.Partial(
        lightning_opd,
        work_dir="runs/tiny_pipeline",
        teacher=f"{inputs}/teacher",
        base_student=f"{inputs}/student",
        sft_prompts=f"{inputs}/sft_prompts.jsonl",
        opd_prompts=f"{inputs}/opd_prompts.jsonl",
        eval_data=f"{inputs}/eval.jsonl",
        sft_data=run.Config(GenerateSettings, **small),
        sft=run.Config(TrainSettings, steps=4, overrides={"loss": "sft"}, **cpu_train),
        rollouts=run.Config(GenerateSettings, **small),
        score=run.Config(ScoreSettings, top_k=4, backend="hf", dtype="float32"),
        trainer=run.Config(TrainSettings, steps=4, nproc_per_node=2, **cpu_train),
        eval=run.Config(EvalSettings, samples_per_problem=1, max_tokens=24, temperature=0.0, backend="hf", dtype="float32"),
    )


FACTORIES = {"qwen3_8b": qwen3_8b, "qwen3_4b": qwen3_4b, "qwen3_30b_a3b": qwen3_30b_a3b, "tiny": tiny}
# nemo-run options that take a value (the next argument)
_VALUE_OPTIONS = {"--name", "-n", "--factory", "-f", "--load", "-l", "--yaml", "--rich-theme", "--to-yaml", "--to-toml", "--to-json"}
_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)(\+=|-=|\*=|/=|\|=|&=|=)(.*)$", re.S)
_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _did_you_mean(word: str, choices: list[str]) -> str:
    """The closest matches (difflib), among the word's siblings (same section) first."""
    parent = word.rpartition(".")[0]
    siblings = [c for c in choices if c.rpartition(".")[0] == parent]
    for pool in (siblings, choices):
        scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in pool), reverse=True)
        if scored and scored[0][0] >= 0.6:
            close = [c for r, c in scored[:3] if r >= max(0.6, scored[0][0] - 0.1)]
            return f" (did you mean {' or '.join(close)}?)"
    return ""


def _parameter_types() -> dict[str, Any]:
    hints = typing.get_type_hints(lightning_opd.__wrapped__ if hasattr(lightning_opd, "__wrapped__") else lightning_opd)
    return {k: v for k, v in hints.items() if k not in ("ctx", "return")}


def _all_keys(types: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, hint in types.items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            out += _all_keys(typing.get_type_hints(hint), f"{prefix}{name}.")
    return out


def check_arguments(argv: list[str]) -> None:
    """The recipe's own arguments, each refused in one line before nemo-run parses them (its
    parser prints pages and exits 0): an unknown factory lists the factories, an unknown key
    suggests the close ones, a value that is not of the key's type names the key and the type.
    `run.*` arguments (executor, plugins) are left to nemo-run."""
    from nemo_run.cli.cli_parser import parse_value

    overrides, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if arg in _VALUE_OPTIONS or (name in _VALUE_OPTIONS and value):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if name in ("--factory", "-f"):
                factory = value.split("(", 1)[0]
                if factory not in FACTORIES:
                    raise ConfigError(f"unknown factory {factory!r}{_did_you_mean(factory, list(FACTORIES))}",
                                      f"use --factory with one of: {', '.join(FACTORIES)}")
            i += 1 if arg not in _VALUE_OPTIONS else 2
            continue
        if not arg.startswith("-") and _OVERRIDE.match(arg):
            overrides.append(arg)
        i += 1
    params = _parameter_types()
    keys = _all_keys(params)
    for arg in overrides:
        key, op, value = _OVERRIDE.match(arg).groups()
        if key.split(".", 1)[0] == "run":
            continue
        hint: Any = None
        scope: dict[str, Any] = params
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if part not in scope:
                raise ConfigError(f"unknown key {key!r} in {arg!r}{_did_you_mean(key, keys)}",
                                  "see --help; every pipeline config field is a key, e.g. trainer.lr=1e-6, sft_data.temperature=0.7")
            hint = scope[part]
            inner, _ = without_none(hint)
            if dataclasses.is_dataclass(inner):
                scope = typing.get_type_hints(inner)
            elif depth < len(parts) - 1:
                if typing.get_origin(inner) is dict or inner is dict:
                    hint = None  # a key inside a dict field (envs.train.env.X, trainer.overrides.x): free-form
                    break
                raise ConfigError(f"unknown key {key!r} in {arg!r}: {'.'.join(parts[:depth + 1])} has no fields", "see --help for the keys")
        inner, optional = without_none(hint)
        if op != "=" or inner not in _SCALAR_NAMES:
            continue
        if optional and value.strip().lower() in ("none", "null"):
            continue
        try:
            parse_value(value, inner)
        except Exception:  # nemo-run's own parser refuses it: say so in one line
            raise ConfigError(f"bad value for {key}: {value!r} is not {_SCALAR_NAMES[inner]}{' (or None)' if optional else ''}",
                              f"write {key}=VALUE with VALUE {_SCALAR_NAMES[inner]}") from None


def _confirmed(args: list[str]) -> bool:
    return any(a in ("--yes", "--no-confirm") for a in args)


def main(argv: Optional[list[str]] = None) -> int:
    """`run.cli.main(lightning_opd)` with an exit code: nemo-run's own main drops the code of its
    argument and parsing errors (it prints them and exits 0). Arguments are checked first (one
    line each); `--dryrun` never asks for confirmation, and without a terminal a run needs --yes
    (nemo-run would fail with an empty "Unexpected error:")."""
    import typer

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--help", "-h") for a in args):
        try:
            check_arguments(args)
            exporting = any(a.split("=", 1)[0] in ("--to-yaml", "--to-toml", "--to-json") for a in args)
            if "--dryrun" in args and not _confirmed(args):
                args.append("--yes")  # a dry run submits and writes nothing: nothing to confirm
            elif not _confirmed(args) and not exporting and (sys.stdin is None or not sys.stdin.isatty()):
                raise ConfigError("no terminal to confirm the launch on (stdin is not a terminal)",
                                  "pass --yes to launch without confirmation, or --dryrun to see the plan")
        except LopdError as exc:
            print(f"lightning_opd: error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
    entry = lightning_opd.cli_entrypoint
    if not hasattr(entry, "_add_command"):  # another nemo-run version: its own main, exit code from SystemExit
        sys.argv[1:] = args
        run.cli.main(lightning_opd)
        return 0
    app = typer.Typer(help=entry.help_str, pretty_exceptions_enable=False)
    entry._add_command(app, is_main=True)
    rc = app(args=args, standalone_mode=False)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
