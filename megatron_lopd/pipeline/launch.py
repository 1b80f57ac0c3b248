"""How a stage's processes start: its steps (`lopd` invocations), the `lopd` of its environment,
torchrun for multi-process training, the environment variables, and the node topology inside a
SLURM allocation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ConfigError
from megatron_lopd.pipeline.config import StageEnv


@dataclass(frozen=True)
class Step:
    """One `lopd` invocation. `nproc_per_node > 1` or `nnodes > 1`: launched with torchrun.
    `shards > 1`: run once per shard with `--shard i/N` appended."""

    args: tuple[Any, ...]  # str() of each is the argument
    nproc_per_node: int = 1
    nnodes: int = 1
    shards: int = 1


def lopd_command(env: StageEnv) -> tuple[list[str], str]:
    """(argv prefix that runs `lopd`, python interpreter) for a stage environment."""
    if env.venv:  # the venv may live on the cluster only: no existence check here
        return [str(Path(env.venv) / "bin" / "lopd")], str(Path(env.venv) / "bin" / "python")
    if env.python:
        python = env.python
    else:
        python = sys.executable
    beside = Path(python).parent / "lopd"
    if beside.is_file():
        return [str(beside)], python
    found = shutil.which("lopd")
    if found and not (env.venv or env.python):
        return [found], python
    # No console script: run the CLI module through the interpreter itself.
    return [python, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"], python


def torchrun_command(python: str, lopd: list[str], args: list[str], step: Step, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    if lopd[0] == python:  # `python -c ...`: torchrun needs a script; use the module entry instead
        raise ConfigError(f"{python}: no `lopd` console script beside it for torchrun", "pip install megatron-lopd into that environment")
    launch = [python, "-m", "torch.distributed.run", f"--nproc-per-node={step.nproc_per_node}"]
    if step.nnodes == 1:
        launch += ["--standalone"]
    else:
        launch += [f"--nnodes={step.nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    return [*launch, lopd[0], *args]


def stage_environ(env: StageEnv, base: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ if base is None else base)
    if env.venv:
        out["PATH"] = f"{Path(env.venv) / 'bin'}{os.pathsep}{out.get('PATH', '')}"
        out["VIRTUAL_ENV"] = str(env.venv)
    out.update({k: str(v) for k, v in env.env.items()})
    return out


def slurm_node_topology() -> tuple[int, str, int]:
    """(node rank, master address, master port) inside a SLURM allocation; single node otherwise."""
    if "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NNODES", "1")) <= 1:
        return 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29500))
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True).stdout.split()
    port = int(os.environ.get("MASTER_PORT", 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    return int(os.environ.get("SLURM_NODEID", 0)), os.environ.get("MASTER_ADDR", hosts[0]), port

