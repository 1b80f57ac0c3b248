"""Distributed initialisation, parallel state, seeds and the CPU compatibility layer."""

from megatron_lopd.runtime.distributed import (
    LaunchInfo,
    ParallelConfig,
    destroy_distributed,
    device,
    init_distributed,
    init_torch_distributed,
    launch_info,
    set_seeds,
)

__all__ = [
    "LaunchInfo",
    "ParallelConfig",
    "destroy_distributed",
    "device",
    "init_distributed",
    "init_torch_distributed",
    "launch_info",
    "set_seeds",
]
