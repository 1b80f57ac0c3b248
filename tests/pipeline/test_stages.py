"""The stage graph (megatron_lopd/pipeline/stages.py): one teacher, each stage's command lines and environment."""

import sys
from pathlib import Path

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.pipeline import STAGE_NAMES, StageEnv, build_stages

LOPD = str(Path(sys.executable).parent / "lopd")


def test_stage_graph_wires_one_teacher_into_sft_data_and_scoring(config):
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


def test_train_stage_argv_carries_paths_knobs_and_torchrun(config):
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


def test_sharded_scoring_runs_every_shard_then_finalizes(config):
    config.score.shards = 3
    score = {s.name: s for s in build_stages(config)}["score"]
    cmds = score.commands()
    assert [c[-1] for c in cmds] == ["--shard=0/3", "--shard=1/3", "--shard=2/3", "--no-progress"]
    assert "--finalize" in cmds[-1] and all("--finalize" not in c for c in cmds[:-1])
    config.score.shards = 1  # one worker finalizes itself
    (cmd,) = {s.name: s for s in build_stages(config)}["score"].commands()
    assert cmd[-1] == "--shard=0/1" and "--finalize" not in cmd


def test_stage_environments_resolve_per_stage(config):
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
