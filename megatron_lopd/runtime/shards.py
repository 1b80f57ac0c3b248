"""`--shard I/N`, the one way work is split between processes: worker I of N (0-based) takes
the items i with i % N == I (generation chunks, store shards, evaluation problems)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_lopd.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count``. Unpacks as ``index, count``, like the tuples configs held."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ConfigError(f"--shard {self}: need 0 <= I < N", "e.g. --shard 3/4 for the last of four workers")

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        try:
            index, count = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {spec!r} is not of the form I/N", "e.g. --shard 0/4 for the first of four workers") from None
        return cls(index, count)

    def __iter__(self):
        return iter((self.index, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def indices(self, num_items: int) -> list[int]:
        return list(range(self.index, num_items, self.count))

    @property
    def dirname(self) -> str:
        """The directory of this shard's own results (evaluation)."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"


def parse_shard(spec: str | None) -> Shard:
    """`--shard I/N`; None: from the launcher (SLURM array task / srun task / torchrun rank), else 0/1."""
    if spec is not None:
        return Shard.parse(spec)
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
    from megatron_lopd.runtime.distributed import launch_info  # torch: only when the launcher decides

    info = launch_info()
    return Shard(info.rank, info.world_size)
