"""torch.distributed + megatron parallel state + seeds, for the trainer, tools and demo.

Launch styles it understands, in order:
- torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT),
- srun-native ranks (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR set by
  the sbatch script),
- a plain single process (no launcher at all): world size 1 on an in-process store.

NCCL when CUDA is available, gloo otherwise; on a machine without CUDA it installs the
CPU compatibility layer before megatron-core touches a device.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.runtime import cuda_compat


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left of the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1  # TP inside the experts (MoE only)
    context_parallel: int = 1
    sequence_parallel: bool = False

    def data_parallel(self, world_size: int) -> int:
        model = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model:
            raise ConfigError(
                f"world size {world_size} is not divisible by TP {self.tensor_parallel} x "
                f"PP {self.pipeline_parallel} x CP {self.context_parallel} = {model}",
                "launch a multiple of TP*PP*CP processes or change the parallel layout",
            )
        dp = world_size // model
        experts = self.expert_tensor_parallel * self.expert_parallel * self.pipeline_parallel
        if world_size % experts:
            # The expert layers are laid out as ETP x EP x expert-DP x PP over the same ranks.
            raise ConfigError(
                f"world size {world_size} is not divisible by expert TP {self.expert_tensor_parallel} x "
                f"EP {self.expert_parallel} x PP {self.pipeline_parallel} = {experts}",
                "choose EP x parallel.expert_tensor_parallel x PP dividing the world size",
            )
        return dp


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun", "single"


def launch_info() -> LaunchInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return LaunchInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun"
        )
    return LaunchInfo(0, 1, 0, "single")


def init_torch_distributed(timeout_minutes: float = 30.0) -> LaunchInfo:
    """Initialise the default process group (idempotent)."""
    import torch.distributed as dist

    info = launch_info()
    if dist.is_initialized():
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), info.local_rank, info.launcher)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    else:
        cuda_compat.install()
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if info.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if info.launcher == "srun" and "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                "srun-native launch without MASTER_ADDR",
                "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) and MASTER_PORT",
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend, init_method="env://", rank=info.rank, world_size=info.world_size, timeout=timeout
        )
    return info


def set_seeds(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's model-parallel RNG tracker.

    Megatron's convention: every pipeline stage gets its own seed (seed + 100 * pp_rank);
    the tracker derives distinct tensor-parallel streams from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234) -> LaunchInfo:
    """torch.distributed, megatron parallel state and seeds, in one call."""
    from megatron.core import parallel_state

    if parallel.sequence_parallel and not torch.cuda.is_available():
        raise ConfigError(
            "sequence parallel needs Transformer Engine on a GPU",
            "set sequence_parallel=false on a machine without CUDA",
        )
    info = init_torch_distributed()
    parallel.data_parallel(info.world_size)  # validates divisibility with a clear message
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        # Gloo side groups only where gloo is the backend anyway: on GPU nodes they are unused
        # (our optimizer and checkpoint formats communicate over NCCL) and a classic multi-node
        # failure (gloo picks the wrong interface without GLOO_SOCKET_IFNAME).
        create_gloo_process_groups=not torch.cuda.is_available(),
    )
    set_seeds(seed)
    return info


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
