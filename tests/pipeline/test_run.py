"""Running stages (megatron_lopd/pipeline/run.py): `lopd pipeline`, one stage's runner (as subprocesses
or in this process), and each output verified once per invocation (issue 15)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.pipeline import STAGE_NAMES, Stage, StageEnv, StageFailed, build_stages, plan, run_local, run_stage, status

LOPD = str(Path(sys.executable).parent / "lopd")


def test_lopd_pipeline_cli_reports_bad_config_in_one_line(config, tmp_path):
    path = config.save(tmp_path / "p.json")
    out = subprocess.run([LOPD, "pipeline", "status", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr  # nothing done yet
    assert [line.split()[:2] for line in out.stdout.strip().splitlines()] == [[n, "pending"] for n in STAGE_NAMES]
    out = subprocess.run([LOPD, "pipeline", "run", "--config", str(path), "--stages", "train"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "from stage sft, which is not done" in out.stderr
    data = json.loads(path.read_text())
    data["trainer"]["steps"] = "many"
    path.write_text(json.dumps(data))
    out = subprocess.run([LOPD, "pipeline", "status", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and "trainer.steps='many' is not an integer" in out.stderr


def test_export_clears_only_a_partial_export_it_wrote(config):
    export = {s.name: s for s in build_stages(config.absolute())}["export"]
    out = export.output
    out.mkdir(parents=True)
    (out / "notes.md").write_text("mine")  # someone else's directory at the export path
    with pytest.raises(ArtifactError, match="refused: .*student_hf is not a partial HF export .*notes.md"):
        run_stage(export, echo=lambda line: None)
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")  # an interrupted `lopd convert to-hf`
    (out / "config.json").write_text("{}")
    with pytest.raises(StageFailed):  # cleared, then the converter fails: there is no training run here
        run_stage(export, echo=lambda line: None)
    assert not (out / "model-00001-of-00002.safetensors").exists()


def test_in_process_execution_gets_lopd_arguments_and_refuses_torchrun(config):
    config.trainer.nproc_per_node = 2
    stages = {s.name: s for s in build_stages(config.absolute())}
    with pytest.raises(ConfigError, match="stage train starts torchrun ranks, which cannot run in this process"):
        run_stage(stages["train"], execute=lambda args: 0, echo=lambda line: None)
    seen: list[list[str]] = []
    with pytest.raises(StageFailed, match="finished but its output does not verify"):  # the stand-in wrote nothing
        run_stage(stages["score"], execute=lambda args: seen.append(args) or 0, echo=lambda line: None)
    assert seen == [args for _step, args in stages["score"].invocations()] and seen[0][0] == "score"


# --------------------------------------------------------------------------- each output verified once per invocation
@pytest.fixture
def verifications(monkeypatch) -> dict[str, int]:
    """Counts checksum passes over a teacher store, and output checks per stage; `.clear()` between
    invocations (the counts restart at 0)."""
    import megatron_lopd.store
    import megatron_lopd.store.verify as store_verify

    counts: dict[str, int] = {}
    real_verify, real_check = store_verify.verify_store, Stage.check

    def verify_store(*args, **kwargs):
        counts["store checksums"] = counts.get("store checksums", 0) + 1
        return real_verify(*args, **kwargs)

    def check(stage):
        counts[stage.name] = counts.get(stage.name, 0) + 1
        return real_check(stage)

    monkeypatch.setattr(store_verify, "verify_store", verify_store)
    monkeypatch.setattr(megatron_lopd.store, "verify_store", verify_store)
    monkeypatch.setattr(Stage, "check", check)
    return counts


def _trainer_fails_at_once(config, tmp_path):
    """`config` with a train stage whose environment's `lopd` exits 3 at once: an invocation gets
    exactly as far as starting the training."""
    lopd = tmp_path / "venv" / "bin" / "lopd"
    lopd.parent.mkdir(parents=True)
    lopd.write_text("#!/bin/sh\nexit 3\n")
    lopd.chmod(0o755)
    return dataclasses.replace(config, envs=dataclasses.replace(config.envs, train=StageEnv(venv=str(lopd.parent.parent))),
                               trainer=dataclasses.replace(config.trainer, nproc_per_node=1))


ONCE = {"store checksums": 1, **dict.fromkeys(STAGE_NAMES, 1)}


def test_a_resumed_run_verifies_each_output_once(store_done, verifications, tmp_path):
    """Before: plan, the training pre-check's is_done, check_training_inputs, and again in run_local
    and run_stage: up to six checksum passes over the store before training started."""
    config = _trainer_fails_at_once(store_done, tmp_path)
    lines: list[str] = []
    with pytest.raises(StageFailed, match="stage train: .* exited with 3"):
        run_local(config, echo=lines.append)
    assert verifications == ONCE
    assert "[pipeline] score: already done (1 shards" in "\n".join(lines)
    verifications.clear()
    assert {r.name: r.status for r in status(config)} == {**dict.fromkeys(("sft_data", "sft", "rollouts", "score"), "done"),
                                                          **dict.fromkeys(("train", "export", "eval"), "pending")}
    assert verifications == ONCE
    verifications.clear()  # the job a recipe submits for one stage: `lopd pipeline run --stages train`
    with pytest.raises(StageFailed, match="exited with 3"):
        run_local(config, "train", echo=lambda line: None)
    assert verifications == {"store checksums": 1, **dict.fromkeys(("sft_data", "sft", "rollouts", "score", "train"), 1)}


def test_a_resumed_recipe_launch_verifies_each_output_once(store_done, verifications, tmp_path, capsys):
    from recipes.lightning_opd import launch, report

    config = _trainer_fails_at_once(store_done, tmp_path)
    assert launch(config, "all", None, dryrun=True) == 0
    assert verifications == ONCE
    verifications.clear()
    with pytest.raises(StageFailed, match="stage train: .* exited with 3"):
        launch(config, "all", None)  # no executor: the stages run in this process
    assert verifications == ONCE
    assert "score: already done, skipped" in capsys.readouterr().out
    # after the jobs ran, the report verifies again only the outputs they made
    stages = build_stages(config.absolute())
    known: dict = {}
    plan(stages, stages, known=known)
    verifications.clear()
    pending = [s for s in stages if s.name in ("train", "export", "eval")]
    assert report(config.absolute(), pending, {s.name: {"status": "SUCCEEDED"} for s in pending}, detached=False, known=known) == 1
    assert verifications == dict.fromkeys(("train", "export", "eval"), 1)


# --------------------------------------------------------------------------- engines side by side


def _artifact_records(path):
    from megatron_lopd.artifacts import RolloutArtifact

    art = RolloutArtifact.open(path)
    return art.fingerprint, [(r.prompt_id, r.sample_index, r.response_ids.tolist(), r.finish_reason) for r in art]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_engines_side_by_side_write_what_one_engine_writes(tmp_path_factory, backend):
    """Two engine processes of a stage run at once (engines_per_node=2: two `lopd generate` shards
    started together by the runner), each owning every other chunk; the artifact they finish is
    the one a single engine writes (same fingerprint, same records)."""
    from tests.pipeline.conftest import tiny_config

    if backend == "vllm":
        pytest.importorskip("vllm")
    config = tiny_config(tmp_path_factory, f"engines-{backend}")
    config.sft_data.backend = backend
    config.sft_data.extra_args = ["--chunk-size", "2"]  # 8 prompts: 4 chunks, 2 per engine
    one = dataclasses.replace(config, work_dir=str(Path(config.work_dir).parent / "one"))
    lines: list[str] = []
    run_local(one, "sft_data", echo=lines.append)
    config.sft_data.engines_per_node = 2
    run_local(config, "sft_data", echo=lines.append)
    started = [line for line in lines if "sft_data: " in line and " generate " in line]
    assert [line.split("--shard=")[1].split()[0] for line in started] == ["0/1", "0/2", "1/2"], started
    assert _artifact_records(Path(config.work_dir) / "sft_data") == _artifact_records(Path(one.work_dir) / "sft_data")
    # Scoring that artifact with its own writer (the consistent teacher): two engines, then one
    # finalize, write the store one engine writes (every shard file byte for byte).
    from megatron_lopd.pipeline.checks import verify_store
    from megatron_lopd.pipeline.launch import EngineLayout, Step
    from tests.generation.test_score import _assert_same_store

    stores = {}
    for engines in (1, 2):
        out = Path(config.work_dir).parent / f"store-{engines}"
        score = ("score", "--rollouts", str(Path(one.work_dir) / "sft_data"), "--teacher", config.teacher, "--out", str(out), "--top-k", "4",
                 "--backend", backend, "--dtype", "float32", "--sequences-per-shard", "2", "--no-progress")
        stage = Stage("score", inputs={}, outputs={"store": out}, verify=verify_store, env=StageEnv(),
                      steps=(Step(score, engines=EngineLayout(per_node=engines)),
                             Step(("score", "--out", str(out), "--finalize", "--no-progress"), only_after_several_engines=True)))
        run_stage(stage, echo=lines.append)
        stores[engines] = out
    assert sum(" --finalize " in line for line in lines) == 1  # only after the two engines
    _assert_same_store(stores[2], stores[1])


def test_multi_node_engines_wait_for_every_node_before_finalizing(tmp_path, monkeypatch):
    """nodes > 1: each node records how its engines ended; node 0 goes on (to finalize) only once
    every node's engines ended well, and fails naming a node whose engines failed."""
    import threading

    from megatron_lopd.pipeline.run import _engines_barrier

    stage = dataclasses.make_dataclass("S", ["name", "output", "nnodes"])("score", tmp_path / "store", 2)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    waited = threading.Thread(target=_engines_barrier, args=(stage, 0, 0, lambda line: None), kwargs={"poll_s": 0.05})
    waited.start()
    waited.join(0.3)
    assert waited.is_alive()  # node 1 has not finished yet
    _engines_barrier(stage, 1, 0, lambda line: None)  # a non-zero node records and returns at once
    waited.join(5)
    assert not waited.is_alive()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued life does not read the previous life's records
    _engines_barrier(stage, 1, 3, lambda line: None)
    with pytest.raises(StageFailed, match="stage score: the engines of node-1 failed"):
        _engines_barrier(stage, 0, 0, lambda line: None, poll_s=0.05)
