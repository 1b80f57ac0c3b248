"""The consistent-teacher pipeline, defined once: stages with declared inputs and outputs.

    teacher --generate--> sft_data --train(sft)--> sft (R, + HF export) --generate(R)--> rollouts
      --score(teacher)--> store --train(lightning)--> train --convert to-hf--> export --eval--> eval

`PipelineConfig` has ONE teacher path; `build_stages` hands that very object to the
SFT-data stage and to the scoring stage, so the model that writes the SFT data is the
model that scores the rollouts by construction (DESIGN section 4; the trainer checks it
again from the artifacts' manifests).

Every stage runs `lopd` subcommands (torchrun for multi-process training) in its own
environment (`StageEnv`: a venv, a python, a container image for SLURM) and verifies its
output with the check of the artifact's owner. A verified output is done only if what it records
about its making (model / prompt / data fingerprints, sampling, scoring and training settings)
matches what the config asks now; otherwise it is stale, and so is everything downstream of it
(`plan`, `status`). Done stages are skipped, so a rerun continues where it stopped; stale ones
are refused, or with `rerun_stale` moved to `<dir>.stale-<time>` and made again. Each output is
verified once per invocation. The same stages are run by `run_local` (plain subprocesses), by
`lopd pipeline run`, by the demo, and by the nemo-run recipes (one SLURM job per stage, chained
by dependencies).

    stages.py     the graph: artifact paths, stages, `build_stages`, selection
    config.py     `PipelineConfig`, per-stage settings and environments, file / override loading
    checks.py     output verification (adapters over the owners' checks), input pre-checks
    staleness.py  what each output records against what the config asks now
    plan.py       stage states (done, stale, pending) and the plan of one invocation
    launch.py     steps, engine layouts, `lopd` / torchrun command lines and environments
    run.py        `run_stage`, `run_local`, `status`
"""

from megatron_lopd.pipeline.checks import check_training_inputs
from megatron_lopd.pipeline.config import CONFIG_NAME, EvalSettings, GenerateSettings, PipelineConfig, ScoreSettings, StageEnv, StageEnvs, TrainSettings
from megatron_lopd.pipeline.launch import lopd_command, visible_gpus
from megatron_lopd.pipeline.plan import Plan, StaleError, plan, set_aside, stage_states
from megatron_lopd.pipeline.run import (StageFailed, StageResult, format_results, lopd_in_process, run_local, run_planned, run_stage,
                                        state_results, status)
from megatron_lopd.pipeline.stages import STAGE_NAMES, ArtifactPaths, Stage, StageState, Step, build_stages, select_stages

__all__ = [
    "CONFIG_NAME", "STAGE_NAMES", "ArtifactPaths", "EvalSettings", "GenerateSettings", "PipelineConfig", "Plan", "ScoreSettings", "Stage",
    "StageEnv", "StageEnvs", "StageFailed", "StageResult", "StageState", "StaleError", "Step", "TrainSettings", "build_stages",
    "check_training_inputs", "format_results", "lopd_command", "lopd_in_process", "plan", "run_local", "run_planned", "run_stage", "select_stages",
    "set_aside", "stage_states", "state_results", "status", "visible_gpus",
]
