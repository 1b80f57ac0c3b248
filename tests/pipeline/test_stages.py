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


def test_engine_stages_fill_the_node_with_pinned_engines_then_finalize(config):
    """An engine stage runs GPUs / TP engines side by side on a node, each pinned to its own GPUs
    (CUDA_VISIBLE_DEVICES) and owning shard node_rank * E + j of N = E x nodes; scoring then
    finalizes once (a lone engine finalizes itself). Bad layouts are refused in one line."""
    config.score.tensor_parallel = 2
    score = {s.name: s for s in build_stages(config)}["score"]
    eight = [str(g) for g in range(8)]
    engines, finalize = score.launches(gpus=eight)
    assert [env for _argv, env in engines] == [{"CUDA_VISIBLE_DEVICES": d} for d in ("0,1", "2,3", "4,5", "6,7")]
    assert [argv[-1] for argv, _env in engines] == [f"--shard={j}/4" for j in range(4)]
    assert all(argv[argv.index("--tensor-parallel") + 1] == "2" and argv[argv.index("--dtype") + 1] == "bfloat16" for argv, _ in engines)
    assert "--max-model-len" not in engines[0][0]  # what the work needs, decided by the engine
    ((final, final_env),) = finalize
    assert "--finalize" in final and final_env == {}
    config.score.nodes, config.score.engines_per_node = 2, 3
    node1 = {s.name: s for s in build_stages(config)}["score"].waves(node_rank=1, gpus=eight)[0]
    assert [args[-1] for _step, args, _env in node1] == ["--shard=3/6", "--shard=4/6", "--shard=5/6"]
    # No GPUs (CPU, a dry run on a laptop): one engine, which finalizes the store itself.
    config.score.nodes, config.score.engines_per_node, config.score.tensor_parallel = 1, 0, 1
    ((cmd,),) = [[argv for argv, _ in wave] for wave in {s.name: s for s in build_stages(config)}["score"].launches()]
    assert cmd[-1] == "--shard=0/1" and "--finalize" not in cmd
    config.score.tensor_parallel = 3
    with pytest.raises(ConfigError, match=r"this node's 8 GPUs are not divisible by tensor_parallel=3"):
        {s.name: s for s in build_stages(config)}["score"].launches(gpus=eight)
    config.score.tensor_parallel, config.score.engines_per_node = 4, 3
    with pytest.raises(ConfigError, match=r"3 engines x tensor_parallel 4 need 12 GPUs, this node has 8"):
        {s.name: s for s in build_stages(config)}["score"].launches(gpus=eight)
    config.score.gpu_memory_utilization = 1.5
    with pytest.raises(ConfigError, match=r"score.gpu_memory_utilization=1.5 is not valid"):
        build_stages(config)


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
