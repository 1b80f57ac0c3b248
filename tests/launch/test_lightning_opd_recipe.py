"""recipes/lightning_opd.py: the factories, the CLI's exit codes, and the tiny pipeline on a real SLURM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.pipeline import STAGE_NAMES, PipelineConfig, status
from recipes.lightning_opd import pipeline_config, qwen3_4b, qwen3_8b, qwen3_30b_a3b, tiny
from tests.launch.conftest import REPO, SLURM_EXECUTOR, VENV_BIN, launch_env, recipe_cmd, run_recipe
from tests.pipeline.conftest import sft_data_done  # noqa: F401  (fixture: real SFT data of the tiny teacher)


def test_factories_carry_the_paper_settings():
    c8 = pipeline_config(qwen3_8b())
    assert c8.teacher.endswith("/Qwen3-32B") and c8.base_student.endswith("/Qwen3-8B-Base")
    t = c8.trainer
    assert (t.config, t.lr, t.steps, t.global_batch_size) == ("lightning_opd", 2e-6, 150, 256)
    assert (t.tensor_parallel, t.sequence_parallel, t.nproc_per_node) == (4, True, 8)
    assert (c8.sft.lr, c8.sft.steps) == (8e-5, 3000)
    assert (c8.sft_data.temperature, c8.sft_data.top_p, c8.sft_data.max_tokens) == (0.7, 0.9, 16384)
    assert (c8.rollouts.temperature, c8.rollouts.top_p, c8.rollouts.max_tokens) == (0.7, 0.9, 4096)
    c4 = pipeline_config(qwen3_4b())
    assert c4.teacher.endswith("/Qwen3-8B") and c4.base_student.endswith("/Qwen3-4B-Base")
    moe = pipeline_config(qwen3_30b_a3b())
    assert moe.base_student.endswith("/Qwen3-30B-A3B-Base")
    assert (moe.trainer.tensor_parallel, moe.trainer.expert_parallel) == (4, 8)
    small = pipeline_config(tiny())
    assert {small.sft_data.backend, small.rollouts.backend, small.score.backend, small.eval.backend} == {"hf"}
    assert small.trainer.config == "tiny_cpu" and small.trainer.nproc_per_node == 2
    assert isinstance(small, PipelineConfig)


@pytest.mark.parametrize("factory, shape", [(qwen3_8b, "qwen3_8b"), (qwen3_4b, "qwen3_4b"), (qwen3_30b_a3b, "qwen3_30b_a3b")])
def test_each_factory_layout_fits_its_model_and_node(factory, shape):
    """The SFT and OPD stages of each paper factory resolve to a trainer config whose layout splits
    the student's shape and its world (nodes x GPUs), and whose optimizer options reach
    megatron-core's OptimizerConfig. (MoE: TP 4 x EP 8 on 8 GPUs only works with expert TP 1.)"""
    from megatron_lopd.models.qwen3 import named_config
    from megatron_lopd.pipeline.stages import train_overrides
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.loop import megatron_optimizer_config
    from megatron_lopd.training.preflight import StartModel, check_layout, row_multiple

    from megatron_lopd.pipeline.memory import EnginePlan, check_plans, pipeline_plans

    config = pipeline_config(factory())
    # The memory plan on 8 x 80 GB H100 (79.2 GiB each): every stage fits, every engine stage uses all 8 GPUs.
    plans = pipeline_plans(config, gpus_per_node=8, gpu_memory_gib=79.2)
    assert {p.stage for p in plans} == {"sft_data", "rollouts", "score", "eval", "sft", "train"}
    check_plans(plans)
    assert all(p.engines * p.tensor_parallel == 8 and p.sequences_fit >= 4 for p in plans if isinstance(p, EnginePlan))
    # The published data sets in their formats; the paper's suite, sized by its longest benchmark (32K + prompt allowance).
    assert (config.sft_data.format, config.rollouts.format, config.eval.suite) == ("openthoughts3", "dapo_math_17k_slime", "paper")
    assert set(config.eval.suite_data) == {"aime24", "aime25", "hmmt25", "lcb_v5", "lcb_v6"} and config.eval_data is None
    assert next(p for p in plans if p.stage == "eval").max_model_len == 32768 + 1024
    start = StartModel("named", None, named_config(shape), None, None, None)
    paths = {"model.start_from": "/m", "data.store": "/s", "data.sft_data": "/d"}
    for settings in (config.sft, config.trainer):
        train = resolve_config(settings.config, train_overrides(settings, paths))
        world = settings.nproc_per_node * settings.nnodes
        dp = check_layout(train, start, None, world)
        assert dp * train.parallel.tensor_parallel * train.parallel.pipeline_parallel == world
        assert row_multiple(train) % train.parallel.tensor_parallel == 0
        moe = shape == "qwen3_30b_a3b"
        assert (train.optimizer.cpu_offload, train.optimizer.precision_aware) == (moe, moe)
        # megatron-core's OptimizerConfig asks TE's version for the precision-aware optimizer: off here.
        train.optimizer.precision_aware = False
        mcore = megatron_optimizer_config(train, "bf16")
        assert mcore.optimizer_cpu_offload == moe and not mcore.use_precision_aware_optimizer
        if moe:
            assert train.parallel.expert_tensor_parallel == 1 and train.parallel.expert_parallel == 8
            assert (mcore.optimizer_offload_fraction, mcore.overlap_cpu_optimizer_d2h_h2d) == (1.0, True)
            assert (train.model.recompute, train.data.micro_batch_tokens) == ("full", 12288)
            moe_etp4 = resolve_config(settings.config, train_overrides(settings, {**paths, "parallel.expert_tensor_parallel": 4}))
            with pytest.raises(Exception, match="not divisible by expert TP 4 x EP 8 x PP 1 = 32"):
                check_layout(moe_etp4, start, None, world)


def test_an_engine_layout_that_cannot_fit_is_refused_with_the_fix():
    """Qwen3-32B at TP 1 with its 40,960-token context on an 80 GB H100: one sequence's KV cache
    (10 GiB) exceeds what the 61 GiB of weights leave; the line names the fix."""
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.pipeline.memory import check_plans, pipeline_plans

    config = pipeline_config(qwen3_8b())
    config.sft_data.tensor_parallel, config.sft_data.max_model_len = 1, 40960
    with pytest.raises(ConfigError, match=r"stage sft_data: one 40,960-token sequence needs 10.0 GiB of KV cache per GPU, but TP 1 "
                                          r"leaves .* \(fix: raise tensor_parallel to 2 or lower max_model_len to [\d,]+\)"):
        check_plans(pipeline_plans(config, gpus_per_node=8, gpu_memory_gib=79.2))


def test_each_stage_gets_its_own_environment_and_executor(tmp_path, monkeypatch):
    """Per-stage environments: a container image for training, a venv for generation; the SLURM
    job script of a stage (nemo-run dry run) carries the pyxis flags and the stage's node count."""
    import fiddle as fdl
    import nemo_run as run

    from megatron_lopd.pipeline import StageEnv, build_stages
    from recipes.lightning_opd import _job_script, slurm, stage_executor

    monkeypatch.setattr("nemo_run.config._NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # nemo-run's local tunnel (invoke) reads stdin
    config = pipeline_config(tiny())
    config.work_dir = str(tmp_path / "w")
    config.envs.train = StageEnv(container_image="nvcr.io/nvidia/nemo:25.09", container_mounts=["/lustre:/lustre"])
    config.envs.rollouts = StageEnv(venv="/opt/vllm-venv")
    config.trainer.nnodes = 2
    stages = {s.name: s for s in build_stages(config)}
    base = fdl.build(slurm())
    base.account = "acct"
    train = stage_executor(base, stages["train"])
    assert (train.nodes, train.ntasks_per_node, train.container_image) == (2, 1, "nvcr.io/nvidia/nemo:25.09")
    assert train.additional_parameters["kill_on_invalid_dep"] == "yes" and base.container_image is None
    cfg = tmp_path / "w" / "pipeline.json"
    assert _job_script(stages["train"], cfg) == f"exec lopd pipeline run --config {cfg} --stages train\n"  # lopd of the image
    assert _job_script(stages["rollouts"], cfg).startswith("exec /opt/vllm-venv/bin/lopd pipeline run")
    assert _job_script(stages["score"], cfg).startswith(f"exec {VENV_BIN / 'lopd'} pipeline run")
    with run.Experiment("envs", executor=base, log_level="WARN") as exp:
        exp.add(run.Script(inline=_job_script(stages["train"], cfg)), executor=train, name="train")
        exp.dryrun(log=False, delete_exp_dir=False)
    (sbatch,) = (tmp_path / "nemorun" / "experiments" / "envs").glob("*/train_sbatch.sh")
    text = sbatch.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --kill-on-invalid-dep=yes" in text
    assert "--container-image nvcr.io/nvidia/nemo:25.09" in text and "/lustre:/lustre" in text


@pytest.mark.slow  # three nemo-run CLI start-ups, ~20 s each on a busy 2-core machine
def test_cli_overrides_and_bad_arguments_set_the_exit_code(tmp_path):
    env = launch_env()
    proc = subprocess.run(recipe_cmd("--factory", "qwen3_8b", "trainer.lr=1e-6", "score.engines_per_node=8", f"work_dir={tmp_path / 'w'}", "--dryrun", "--yes"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("[lightning_opd] ") and ": " in line)
    train = plan["[lightning_opd] train"].split()
    assert {"optimizer.lr=1e-06", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true", "--nproc-per-node=8"} <= set(train)
    assert "--shard=7/8" in proc.stdout and "warning (dry run): stage sft_data: input teacher" in proc.stdout
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
    # nemo-run's own CLI prints a parse error and exits 0; ours exits non-zero
    proc = subprocess.run(recipe_cmd("--factory", "qwen3_8b", "trainer.lrr=1e-6", "--yes"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trainer.lrr" in proc.stdout + proc.stderr
    # inputs that do not exist: one clear line, before anything runs
    proc = subprocess.run(recipe_cmd("--factory", "qwen3_8b", f"work_dir={tmp_path / 'w'}", "--yes"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "lightning_opd: error: stage sft_data: input teacher /models/Qwen3-32B does not exist" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_pipeline_on_slurm_chains_stages_and_writes_every_artifact(slurm, slurm_pipeline, tiny_inputs):
    work, proc, first = slurm_pipeline
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[lightning_opd] all stages succeeded" in proc.stdout
    # every artifact exists and verifies (store checksums, checkpoints, HF manifests, eval summary)
    results = {r.name: r for r in status(PipelineConfig.load(work / "pipeline.json"))}
    assert {n: r.status for n, r in results.items()} == {n: "done" for n in STAGE_NAMES}
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["num_problems"] == 4 and summary["model_dir"] == str(work / "student_hf")
    from megatron_lopd.provenance import model_fingerprint

    assert summary["model_fingerprint"] == model_fingerprint(work / "student_hf")  # eval saw the exported student
    # one SLURM job per stage, each started after the previous one ended (afterok chain)
    jobs = [j for j in slurm.jobs(first) if j["JobName"].startswith("ci-ci.")][: len(STAGE_NAMES)]
    assert [j["stage"] for j in jobs] == list(STAGE_NAMES)
    assert {j["State"] for j in jobs} == {"COMPLETED"}
    for prev, nxt in zip(jobs, jobs[1:]):
        assert nxt["Start"] >= prev["End"], f"{nxt['stage']} started {nxt['Start']} before {prev['stage']} ended {prev['End']}"
    # the teacher that wrote the SFT data is the one that scored the store (by construction)
    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.store import TeacherStore

    prov = TeacherStore.open(work / "teacher_store").provenance
    assert prov.teacher_fingerprint == RolloutArtifact.open(work / "sft_data").generator_fingerprint
    assert prov.teacher_fingerprint == model_fingerprint(tiny_inputs / "teacher")
    # the rollouts were sampled by the SFT model, and OPD started from it
    assert prov.rollout_generator_fingerprint == model_fingerprint(work / "sft" / "hf")


@pytest.mark.slurm
@pytest.mark.slow
def test_rerun_skips_finished_stages(slurm, slurm_pipeline, nemorun_home, tiny_inputs):
    work, proc, _ = slurm_pipeline
    assert proc.returncode == 0
    before = slurm.next_job_id()
    again = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", *SLURM_EXECUTOR, f"work_dir={work}", "--yes")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do: every selected stage is done" in again.stdout
    assert all(f"{n}: already done, skipped" in again.stdout for n in STAGE_NAMES)
    assert slurm.next_job_id() == before  # nothing was submitted


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_stage_cancels_the_rest_and_exits_nonzero(slurm, slurm_pipeline, nemorun_home, tiny_inputs, tmp_path):
    import shutil

    work, proc, _ = slurm_pipeline
    assert proc.returncode == 0
    fresh = tmp_path / "work"
    for done in ("sft_data", "sft"):  # finished stages are skipped; the run starts at rollouts
        shutil.copytree(work / done, fresh / done, symlinks=True)
    bad = tmp_path / "bad_prompts.jsonl"
    bad.write_text("{not json\n")
    first = slurm.next_job_id()
    failed = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", *SLURM_EXECUTOR, f"work_dir={fresh}",
                        f"opd_prompts={bad}", "--yes")
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "sft_data: already done, skipped" in failed.stdout and "sft: already done, skipped" in failed.stdout
    jobs = slurm.jobs(first)
    by_stage = {j["stage"]: j["State"] for j in jobs}
    assert by_stage == {"rollouts": "FAILED", "score": "CANCELLED", "train": "CANCELLED", "export": "CANCELLED", "eval": "CANCELLED"}
    for prev, job in zip(jobs, jobs[1:]):  # each waited on the previous one, which never succeeded
        info = slurm.show_job(job["JobID"])
        assert info["Dependency"] == f"afterok:{prev['JobID']}(failed)" and info["Reason"] == "DependencyNeverSatisfied"
    assert "rollouts: FAILED" in failed.stderr and "invalid JSON" in failed.stderr  # the cause, with its log
    assert "FAILED: 5 task(s) not succeeded" in failed.stderr
    assert not (fresh / "teacher_store").exists()


@pytest.mark.slurm
@pytest.mark.slow  # starts (and may install) SLURM daemons
def test_bad_slurm_settings_fail_before_submitting(slurm, nemorun_home, tiny_inputs, tmp_path):
    before = slurm.next_job_id()
    proc = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", *SLURM_EXECUTOR, "run.executor.partition=nosuch",
                      f"work_dir={tmp_path / 'w'}", "--yes")
    assert proc.returncode == 2
    assert "SLURM partition 'nosuch' does not exist (this cluster has: debug, gpu)" in proc.stderr
    proc = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", "run.executor=slurm", "run.executor.account=ci",
                      f"work_dir={tmp_path / 'w'}", "run.executor.gpus_per_node=16", "--yes")
    assert proc.returncode == 2 and "SLURM would never run stage sft_data" in proc.stderr
    proc = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", "run.executor=slurm",  # no account anywhere
                      f"work_dir={tmp_path / 'w'}", "--yes")
    assert proc.returncode == 2 and "SLURM account is not set" in proc.stderr
    assert slurm.next_job_id() == before  # nothing waited in the queue
    assert not (tmp_path / "w" / "pipeline.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_inconsistent_teacher_is_refused_before_anything_runs(slurm, slurm_pipeline, wrong_teacher_store, nemorun_home, tiny_inputs, tmp_path):
    import shutil

    work, proc, _ = slurm_pipeline
    # 1. the config's teacher changed after the SFT data was written: the finished sft_data would be
    #    skipped and the new teacher would score -> refused, nothing runs
    fresh = tmp_path / "work"
    for done in ("sft_data", "sft"):
        shutil.copytree(work / done, fresh / done, symlinks=True)
    config = pipeline_config(tiny())
    config.work_dir, config.teacher, config.base_student = str(fresh), str(tiny_inputs / "student"), str(tiny_inputs / "student")
    config.sft_prompts, config.opd_prompts, config.eval_data = (str(tiny_inputs / n) for n in ("sft_prompts.jsonl", "opd_prompts.jsonl", "eval.jsonl"))
    path = config.save(tmp_path / "pipeline.json")
    out = subprocess.run([str(VENV_BIN / "lopd"), "pipeline", "run", "--config", str(path)],
                         env=launch_env(), capture_output=True, text=True, timeout=600)
    # the SFT data records the old teacher: stale, refused in one line (with --rerun-stale it would be remade)
    assert out.returncode == 2 and "are stale (sft_data, sft)" in out.stderr and "teacher: recorded model-" in out.stderr, out.stderr[-2000:]
    assert not (fresh / "rollouts").exists()
    # 2. one stage alone (train) on a store from another teacher: refused before it is queued
    for done in ("rollouts",):
        shutil.copytree(work / done, fresh / done, symlinks=True)
    shutil.copytree(wrong_teacher_store, fresh / "teacher_store")
    before = slurm.next_job_id()
    out = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", *SLURM_EXECUTOR, f"work_dir={fresh}", "stages=train", "--yes")
    assert out.returncode == 2, out.stdout[-2000:]
    # the store records another teacher than the config's: stale at submit time
    assert "lightning_opd: error: stage train needs store" in out.stderr and "which is stale: teacher: recorded model-" in out.stderr
    assert slurm.next_job_id() == before


# --------------------------------------------------------------------------- the recipe CLI without a terminal (issue 12, item 13)
def _recipe(*args: str, tmp_path=None):
    """The recipe as CI runs it: stdin is not a terminal (closed)."""
    return subprocess.run(recipe_cmd(*args), cwd=REPO, env=launch_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning_opd: error: "), proc.stderr[-2000:]
    return lines[0]


def test_recipe_cli_reports_bad_arguments_in_one_line():
    line = _one_error_line(_recipe("--factory", "qwen3_8b", "trainer.lrr=1e-6", "--dryrun"))
    assert "unknown key 'trainer.lrr'" in line and "did you mean trainer.lr" in line
    line = _one_error_line(_recipe("--factory", "qwen3_8bb", "--dryrun"))
    assert "unknown factory 'qwen3_8bb' (did you mean qwen3_8b?)" in line and "qwen3_4b, qwen3_30b_a3b, tiny" in line
    line = _one_error_line(_recipe("--factory", "tiny", "trainer.lr=fast", "sft_data.tempreature=1"))
    assert "bad value for trainer.lr: 'fast' is not a number" in line
    line = _one_error_line(_recipe("--factory", "tiny", "trainer.lr=1e-6"))  # a launch without --yes: nobody to ask
    assert "no terminal to confirm" in line and "--yes" in line


def test_recipe_dryrun_never_asks_for_confirmation(tmp_path):
    proc = _recipe("--factory", "tiny", f"work_dir={tmp_path / 'w'}", "--dryrun")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Continue?" not in proc.stdout and "Unexpected error" not in proc.stderr
    assert "[lightning_opd] sft_data: " in proc.stdout  # the plan
    assert not (tmp_path / "w").exists()


def test_recipe_refuses_stale_outputs_at_submit_time(sft_data_done, tmp_path, monkeypatch, capsys):
    """On SLURM each job runs one stage, so the stale check happens when the jobs are submitted:
    refused before anything is queued (or `sinfo` is asked), and pipeline.json is not rewritten."""
    import dataclasses

    import fiddle as fdl

    from megatron_lopd.pipeline import StaleError
    from recipes.lightning_opd import launch, slurm

    monkeypatch.setattr("nemo_run.config._NEMORUN_HOME", str(tmp_path / "nemorun"))
    config, inputs = sft_data_done
    work = Path(config.work_dir)
    record = (work / "pipeline.json").read_bytes()
    changed = dataclasses.replace(config, teacher=str(inputs / "student"))
    executor = fdl.build(slurm())
    executor.account = "acct"
    with pytest.raises(StaleError, match=r"stage\(s\) are stale \(sft_data\).*teacher: recorded model-"):
        launch(changed, "all", executor)
    assert "sft_data: teacher: recorded model-" in capsys.readouterr().out  # one line per stale stage
    with pytest.raises(StaleError):
        launch(changed, "all", None)  # in this process: the same check
    # a dry run with rerun_stale shows what would be remade and moves nothing
    assert launch(changed, "all", None, dryrun=True, rerun_stale=True) == 0
    assert "stale, made again: sft_data (dry run: nothing is moved)" in capsys.readouterr().out
    assert (work / "pipeline.json").read_bytes() == record and not list(work.glob("*.stale-*"))
