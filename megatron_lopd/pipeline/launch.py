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
from typing import Any, Optional, Sequence

from megatron_lopd.errors import ConfigError
from megatron_lopd.pipeline.config import StageEnv


@dataclass(frozen=True)
class EngineLayout:
    """The engine processes of a step: on each of `nodes` nodes, `per_node` engines (0: the node's
    GPUs / TP; one without GPUs) of `tensor_parallel` GPUs each, side by side."""

    tensor_parallel: int = 1
    per_node: int = 0
    nodes: int = 1

    def engines_on(self, gpus: int, where: str = "this node") -> int:
        """Engines on a node with `gpus` GPUs (0: none, e.g. a CPU machine or a dry run)."""
        tp = self.tensor_parallel
        if self.per_node:
            if gpus and self.per_node * tp > gpus:
                raise ConfigError(f"{self.per_node} engines x tensor_parallel {tp} need {self.per_node * tp} GPUs, {where} has {gpus}",
                                  "lower engines_per_node or tensor_parallel (engines_per_node=0 uses every GPU)")
            return self.per_node
        if not gpus:
            return 1
        if gpus % tp:
            raise ConfigError(f"{where}'s {gpus} GPUs are not divisible by tensor_parallel={tp}", "choose a tensor_parallel that divides the GPUs per node")
        return gpus // tp

    def devices(self, gpus: Sequence[str], engine: int) -> dict[str, str]:
        """The environment pinning `engine` to its own GPUs (nothing without GPUs)."""
        tp = self.tensor_parallel
        return {"CUDA_VISIBLE_DEVICES": ",".join(gpus[engine * tp : (engine + 1) * tp])} if gpus else {}


@dataclass(frozen=True)
class Step:
    """One `lopd` invocation. `nproc_per_node > 1` or `nnodes > 1`: launched with torchrun.
    `engines`: run as engine processes (`EngineLayout`), each with `--shard i/N` appended."""

    args: tuple[Any, ...]  # str() of each is the argument
    nproc_per_node: int = 1
    nnodes: int = 1
    engines: Optional[EngineLayout] = None
    only_after_several_engines: bool = False  # e.g. finalizing a store: a lone engine did it itself


def visible_gpus() -> list[str]:
    """This node's GPUs as CUDA_VISIBLE_DEVICES names them (what SLURM or the user allowed)."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


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

