"""The stage graph (megatron_lopd/pipeline.py) and `lopd pipeline`: fast, no SLURM, no models run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.pipeline import (
    STAGE_NAMES,
    PipelineConfig,
    StageEnv,
    build_stages,
    check_inputs,
    run_local,
    select_stages,
    status,
)

LOPD = str(Path(sys.executable).parent / "lopd")


def _config(tmp_path: Path, **kw) -> PipelineConfig:
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir(exist_ok=True)
    for name in ("sft.jsonl", "opd.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("{}\n")
    return PipelineConfig(
        work_dir=str(tmp_path / "work"),
        teacher=str(tmp_path / "teacher"),
        base_student=str(tmp_path / "student"),
        sft_prompts=str(tmp_path / "sft.jsonl"),
        opd_prompts=str(tmp_path / "opd.jsonl"),
        eval_data=str(tmp_path / "eval.jsonl"),
        **kw,
    )


def test_stage_graph_wires_one_teacher_into_sft_data_and_scoring(tmp_path):
    config = _config(tmp_path)
    stages = {s.name: s for s in build_stages(config)}
    assert tuple(stages) == STAGE_NAMES
    # the same object, not merely an equal path: there is no second teacher field to get wrong
    assert stages["sft_data"].inputs["teacher"] is stages["score"].inputs["teacher"]
    gen = stages["sft_data"].commands()[0]
    score = stages["score"].commands()[0]
    assert gen[gen.index("--model") + 1] == config.teacher
    assert score[score.index("--teacher") + 1] == config.teacher
    # the rollouts are sampled by the SFT stage's export (R), not by the teacher
    rollouts = stages["rollouts"].commands()[0]
    assert rollouts[rollouts.index("--model") + 1] == str(stages["sft"].outputs["sft_model"])
    assert "--record-logprobs" in rollouts and "--record-logprobs" not in gen
    # every input of a stage is an external path or another stage's output
    outputs = {str(p): s.name for s in stages.values() for p in s.outputs.values()}
    for stage in stages.values():
        for key, path in stage.inputs.items():
            producer = stage.producers.get(key)
            assert producer is None or outputs[str(path)] == producer, (stage.name, key)


def test_train_stage_argv_carries_paths_knobs_and_torchrun(tmp_path):
    config = _config(tmp_path)
    config.trainer.lr = 1e-6
    config.trainer.tensor_parallel = 4
    config.trainer.sequence_parallel = True
    config.trainer.nproc_per_node = 8
    config.trainer.overrides = {"data.seq_length": 4096}
    train = {s.name: s for s in build_stages(config)}["train"]
    (argv,) = train.commands()
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=8" in argv and "--standalone" in argv
    tail = argv[argv.index(LOPD):]
    assert tail[:4] == [LOPD, "train", "--config", "lightning_opd"]
    w = Path(config.work_dir)
    for item in (
        "optimizer.lr=1e-06", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true", "data.seq_length=4096",
        f"model.start_from={w / 'sft' / 'hf'}", f"data.store={w / 'teacher_store'}", f"data.sft_data={w / 'sft_data'}",
        f"run_dir={w / 'opd'}", "checkpoint.export_hf=false",
    ):
        assert item in tail, item
    # multi-node: static rendezvous with the node rank the caller passes (SLURM_NODEID)
    config.trainer.nnodes = 2
    train = {s.name: s for s in build_stages(config)}["train"]
    (argv,) = train.commands(node_rank=1, master_addr="node7", master_port=1234)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=node7", "--master-port=1234"} <= set(argv)


def test_sharded_scoring_runs_every_shard_then_finalizes(tmp_path):
    config = _config(tmp_path)
    config.score.shards = 3
    score = {s.name: s for s in build_stages(config)}["score"]
    cmds = score.commands()
    assert [c[-1] for c in cmds] == ["--shard=0/3", "--shard=1/3", "--shard=2/3", "--no-progress"]
    assert "--finalize" in cmds[-1] and all("--finalize" not in c for c in cmds[:-1])
    config.score.shards = 1  # one worker finalizes itself
    (cmd,) = {s.name: s for s in build_stages(config)}["score"].commands()
    assert cmd[-1] == "--shard=0/1" and "--finalize" not in cmd


def test_stage_environments_resolve_per_stage(tmp_path):
    config = _config(tmp_path)
    config.envs.default = StageEnv(venv="/opt/venv-train", env={"A": "1", "B": "1"})
    config.envs.rollouts = StageEnv(container_image="vllm.sqsh", env={"B": "2"})
    config.envs.score = StageEnv(python=sys.executable)
    stages = {s.name: s for s in build_stages(config)}
    assert stages["train"].commands()[0][stages["train"].commands()[0].index("/opt/venv-train/bin/lopd")] == "/opt/venv-train/bin/lopd"
    assert stages["rollouts"].env.container_image == "vllm.sqsh" and stages["rollouts"].env.venv is None
    assert stages["rollouts"].env.env == {"A": "1", "B": "2"}
    assert stages["score"].commands()[0][0] == LOPD
    config.envs.sft = StageEnv(venv="/a", python="/b")
    with pytest.raises(ConfigError, match="both venv and python"):
        build_stages(config)


def test_config_file_roundtrip_and_overrides(tmp_path):
    config = _config(tmp_path)
    config.envs.train = StageEnv(venv="/v", env={"NCCL_DEBUG": "INFO"})
    path = config.save(tmp_path / "p.json")
    assert PipelineConfig.load(path) == config
    loaded = PipelineConfig.load(path, ["trainer.lr=1e-6", "score.shards=4", "eval_data=none", "envs.train.venv=null", "envs.train.python=/p/python"])
    assert loaded.trainer.lr == 1e-6 and loaded.score.shards == 4 and loaded.eval_data is None
    assert loaded.envs.train.python == "/p/python" and loaded.envs.train.env == {"NCCL_DEBUG": "INFO"}
    assert [s.name for s in build_stages(loaded)][-1] == "export"  # no eval data: no eval stage
    toml = tmp_path / "p.toml"
    toml.write_text(f'work_dir = "{tmp_path}/w"\nteacher = "/t"\n[trainer]\nlr = 3e-6\nnproc_per_node = 2\n')
    t = PipelineConfig.load(toml)
    assert t.trainer.lr == 3e-6 and t.trainer.nproc_per_node == 2 and t.trainer.config == "lightning_opd"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\]"):
        PipelineConfig.load(path, ["trainer.lrr=1"])
    with pytest.raises(ConfigError, match="trainer: lr: 'fast' is not a number"):
        PipelineConfig.load(path, ["trainer.lr=fast"])
    with pytest.raises(ConfigError, match="does not exist"):
        PipelineConfig.load(tmp_path / "missing.json")


def test_inputs_are_checked_before_anything_runs(tmp_path):
    config = _config(tmp_path)
    stages = build_stages(config)
    check_inputs(stages, stages)  # every external input exists; produced ones come from this run
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages(stages, "train,bogus")
    # one stage alone: its inputs from other stages must already verify
    with pytest.raises(ArtifactError, match="stage train needs sft_model .* from stage sft, which is not done"):
        check_inputs(stages, select_stages(stages, "train"))
    config.teacher = str(tmp_path / "no-such-teacher")
    stages = build_stages(config)
    with pytest.raises(ArtifactError, match="input teacher .*no-such-teacher does not exist"):
        check_inputs(stages, stages)
    with pytest.raises(ArtifactError, match="no-such-teacher does not exist"):
        run_local(config)
    assert not Path(config.work_dir).exists()  # nothing ran, nothing was written
    assert {r.status for r in status(config)} == {"pending"}


def test_lopd_pipeline_cli_reports_bad_config_in_one_line(tmp_path):
    config = _config(tmp_path)
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
    assert out.returncode == 2 and "trainer: steps: 'many' is not an integer" in out.stderr


# --------------------------------------------------------------------------- stale outputs (issue 12, item 4)
@pytest.fixture(scope="module")
def sft_data_done(tmp_path_factory):
    """Real SFT data written by the tiny teacher (`lopd generate`, HF backend, seconds on CPU);
    the pipeline config that wrote it is saved as <work>/pipeline.json."""
    from recipes.lightning_opd import pipeline_config, tiny, write_tiny_inputs

    inputs = write_tiny_inputs(str(tmp_path_factory.mktemp("tiny_inputs")))
    config = pipeline_config(tiny())
    config.work_dir = str(tmp_path_factory.mktemp("stale") / "work")
    config.teacher, config.base_student = str(inputs / "teacher"), str(inputs / "student")
    config.sft_prompts, config.opd_prompts, config.eval_data = (str(inputs / n) for n in ("sft_prompts.jsonl", "opd_prompts.jsonl", "eval.jsonl"))
    run_local(config, "sft_data", echo=lambda line: None)
    return config, inputs


def _states(config) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in status(config)}


def test_changed_teacher_or_settings_make_finished_outputs_stale(sft_data_done, tmp_path):
    import dataclasses

    from megatron_lopd.pipeline import StaleError
    from megatron_lopd.provenance import model_fingerprint

    config, inputs = sft_data_done
    work = Path(config.work_dir)
    record = (work / "pipeline.json").read_bytes()
    assert _states(config)["sft_data"][0] == "done"
    old_fp, new_fp = model_fingerprint(inputs / "teacher"), model_fingerprint(inputs / "student")
    # 1. another teacher: the SFT data records the old one -> stale, with both fingerprints
    changed = dataclasses.replace(config, teacher=str(inputs / "student"))
    status_, detail = _states(changed)["sft_data"]
    assert status_ == "stale" and f"teacher: recorded {old_fp}, now {new_fp} ({inputs / 'student'})" in detail
    with pytest.raises(StaleError, match=r"stage\(s\) are stale \(sft_data\).*teacher: recorded model-"):
        run_local(changed, "sft_data", echo=lambda line: None)
    with pytest.raises(StaleError, match="needs sft_data .* from stage sft_data, which is stale: teacher"):
        run_local(changed, "sft", echo=lambda line: None)
    assert (work / "pipeline.json").read_bytes() == record  # the record still names the teacher that wrote the data
    # 2. a sampling setting, and 3. the prompts' content (same file name, other text)
    hotter = dataclasses.replace(config, sft_data=dataclasses.replace(config.sft_data, temperature=0.5))
    assert "sft_data.temperature: recorded 1.0, now 0.5" in _states(hotter)["sft_data"][1]
    prompts = tmp_path / "sft_prompts.jsonl"
    prompts.write_text(Path(config.sft_prompts).read_text().replace("Add 0", "Add 9"))
    assert _states(dataclasses.replace(config, sft_prompts=str(prompts)))["sft_data"][1].startswith("prompts: recorded prompts-")
    # the CLI: one line per stage, exit 3; run refuses in one line, exit 2, and rewrites nothing
    path = changed.save(tmp_path / "changed.json")
    out = subprocess.run([LOPD, "pipeline", "status", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    lines = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.strip().splitlines()}
    assert lines["sft_data"][0] == "stale" and f"recorded {old_fp}, now {new_fp}" in lines["sft_data"][1]
    out = subprocess.run([LOPD, "pipeline", "run", "--config", str(path), "--stages", "sft_data"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "are stale (sft_data)" in out.stderr, out.stderr
    assert "sft_data: teacher: recorded" in out.stdout
    assert (work / "pipeline.json").read_bytes() == record and not list(work.glob("sft_data.stale-*"))


def test_rerun_stale_sets_the_old_output_aside_and_remakes_it(sft_data_done):
    import dataclasses

    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.provenance import model_fingerprint

    config, inputs = sft_data_done
    work = Path(config.work_dir)
    changed = dataclasses.replace(config, teacher=str(inputs / "student"))
    lines: list[str] = []
    run_local(changed, "sft_data", echo=lines.append, rerun_stale=True)
    (aside,) = work.glob("sft_data.stale-*")  # nothing deleted: the old data is kept beside
    assert RolloutArtifact.open(aside).generator_fingerprint == model_fingerprint(inputs / "teacher")
    assert RolloutArtifact.open(work / "sft_data").generator_fingerprint == model_fingerprint(inputs / "student")
    assert any("stale output moved to" in line for line in lines)
    assert json.loads((work / "pipeline.json").read_text())["teacher"] == changed.teacher  # written after the check passed
    assert _states(changed)["sft_data"][0] == "done"
    assert _states(config)["sft_data"][0] == "stale"  # and the old config now sees the new teacher


def test_rerun_of_an_upstream_stage_alone_is_refused_when_it_would_orphan_finished_outputs(tmp_path, monkeypatch):
    """Stages downstream of a stale one are stale too; a rerun must take them along."""
    from megatron_lopd.pipeline import StaleError, plan

    config = _config(tmp_path)
    stages = build_stages(config)
    by_name = {s.name: s for s in stages}
    for stage in stages:  # every output "verifies"; only score's recorded settings differ
        object.__setattr__(stage, "verify", lambda path: "ok")
        Path(stage.output).mkdir(parents=True, exist_ok=True)
        object.__setattr__(stage, "provenance", (lambda: ["score.top_k: recorded 4, now 8"]) if stage.name == "score" else (lambda: []))
    states = {r: s.status for r, s in plan.__globals__["stage_states"](stages).items()}
    assert states == {"sft_data": "done", "sft": "done", "rollouts": "done", "score": "stale", "train": "stale", "export": "stale", "eval": "stale"}
    with pytest.raises(StaleError, match=r"4 stage\(s\) are stale \(score, train, export, eval\)"):
        plan(stages, stages)
    with pytest.raises(StaleError, match="makes the finished outputs of train, export, eval stale"):
        plan(stages, [by_name["score"]], rerun_stale=True)
    checked = plan(stages, stages, rerun_stale=True)
    assert [s.name for s in checked.todo] == ["score", "train", "export", "eval"] == [s.name for s in checked.stale]
    assert all(Path(s.output).exists() for s in stages)  # planning moves nothing


def test_export_clears_only_a_partial_export_it_wrote(tmp_path):
    from megatron_lopd.pipeline import StageFailed, run_stage

    config = _config(tmp_path)
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
