"""Distributed initialisation: launch detection, layout validation, seeds, gloo ranks."""

import pytest
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.runtime import ParallelConfig, launch_info
from tests.dist_utils import run_distributed


def test_launch_info_detects_launchers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert launch_info().launcher == "single"
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = launch_info()
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 8, 1, "srun")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert launch_info().launcher == "torchrun"  # torchrun inside srun wins


def test_layout_validation_messages():
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel(8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP 4"):
        ParallelConfig(tensor_parallel=4).data_parallel(6)
    with pytest.raises(ConfigError, match=r"world size 2 is not divisible by expert TP 1 x EP 4 x PP 1 = 4"):
        ParallelConfig(expert_parallel=4).data_parallel(2)
    # The official MoE layout: TP 4 x EP 8 on 8 GPUs works with expert TP 1 (the default), not TP 4.
    assert ParallelConfig(tensor_parallel=4, expert_parallel=8).data_parallel(8) == 2
    with pytest.raises(ConfigError, match=r"expert TP 4 x EP 8 x PP 1 = 32"):
        ParallelConfig(tensor_parallel=4, expert_parallel=8, expert_tensor_parallel=4).data_parallel(8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_sequence_parallel_refused_without_gpu():
    from megatron_lopd.runtime import init_distributed

    with pytest.raises(ConfigError, match="sequence parallel"):
        init_distributed(ParallelConfig(sequence_parallel=True))


def _rank_layout(tp: int, seed: int):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lopd.runtime import ParallelConfig, init_distributed

    info = init_distributed(ParallelConfig(tensor_parallel=tp), seed=seed)
    out = {
        "launcher": info.launcher,
        "backend": torch.distributed.get_backend(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "default_rand": torch.rand(3),
    }
    # Megatron's tracker: distinct streams per TP rank for model-parallel regions.
    with tensor_parallel.get_cuda_rng_tracker().fork():
        out["tp_region_rand"] = torch.rand(3)
    t = torch.tensor([float(info.rank + 1)])
    torch.distributed.all_reduce(t)
    out["allreduce"] = t.item()
    # Re-initialise with another layout in the same process (used by tools that convert).
    init_distributed(ParallelConfig(tensor_parallel=1), seed=seed)
    out["dp_after"] = ps.get_data_parallel_world_size()
    return out


def test_two_gloo_ranks_tp2_then_dp2():
    r0, r1 = run_distributed(_rank_layout, world_size=2, tp=2, seed=7)
    for r in (r0, r1):
        assert (r["launcher"], r["backend"], r["tp"], r["dp"], r["allreduce"], r["dp_after"]) == (
            "torchrun", "gloo", 2, 1, 3.0, 2)
    assert {r0["tp_rank"], r1["tp_rank"]} == {0, 1}
    # Same seed and same pipeline stage: the default stream agrees, the TP-region streams differ.
    assert torch.equal(r0["default_rand"], r1["default_rand"])
    assert not torch.equal(r0["tp_region_rand"], r1["tp_region_rand"])
