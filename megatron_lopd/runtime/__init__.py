"""Distributed initialisation, parallel state, seeds, the CPU compatibility layer, and the
file-system and process-lifetime rules every stage shares (`files`, `lifetime`).

The distributed names are imported on first use: `runtime.files` must stay importable
without torch (the store and the generation tools use it).
"""

import importlib

_DISTRIBUTED = (
    "LaunchInfo",
    "ParallelConfig",
    "destroy_distributed",
    "device",
    "init_distributed",
    "init_torch_distributed",
    "launch_info",
    "set_seeds",
)


def __getattr__(name: str):
    if name in _DISTRIBUTED:
        return getattr(importlib.import_module("megatron_lopd.runtime.distributed"), name)
    raise AttributeError(f"module 'megatron_lopd.runtime' has no attribute {name!r}")


__all__ = list(_DISTRIBUTED)
