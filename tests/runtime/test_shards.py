"""`--shard I/N`: parsing, messages, the launcher default, and how a shard splits work."""

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.runtime.shards import Shard, parse_shard

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")


def test_parse_and_split():
    shard = parse_shard("1/3")
    assert shard == Shard(1, 3) and tuple(shard) == (1, 3) and str(shard) == "1/3"
    assert shard.indices(8) == [1, 4, 7] and shard.dirname == "shard-00001-of-00003"
    assert sorted(i for s in range(3) for i in Shard(s, 3).indices(8)) == list(range(8))


@pytest.mark.parametrize("spec, message", [
    ("1", "--shard '1' is not of the form I/N"), ("a/b", "is not of the form I/N"), ("1/2/3", "is not of the form I/N"),
    ("2/2", "--shard 2/2: need 0 <= I < N"), ("-1/2", "--shard -1/2: need 0 <= I < N"), ("0/0", "--shard 0/0: need"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_shard(spec)


def test_default_comes_from_the_launcher(monkeypatch):
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert parse_shard(None) == Shard(0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parse_shard(None) == Shard(2, 4)  # srun tasks
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert parse_shard(None) == Shard(2, 3)  # a SLURM array (--array=5-7) wins over srun
