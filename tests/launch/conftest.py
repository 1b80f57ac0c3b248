"""Fixtures for the launch tests: a real local SLURM, the tiny inputs, one tiny pipeline run through it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import LocalSlurm, ensure_installed

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def launch_env(extra: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for launcher subprocesses: the venv first on PATH (nemo-run and SLURM jobs run
    `python`/`lopd` from PATH), one thread per process (2 shared cores), rich wide enough to read."""
    env = dict(os.environ if base is None else base)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="200",
    )
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real local SLURM: 2 nodes (two slurmd on this host) of 16 CPUs and 8 fake GPUs each,
    partitions debug + gpu. Skips, printing why, only where SLURM cannot be installed. Daemons
    are stopped by PID at the end, also after failures."""
    reason = ensure_installed(tmp_path_factory.mktemp("apt") / "apt.log")
    if reason:
        print(f"\nSKIP SLURM tests: {reason}", file=sys.stderr)
        pytest.skip(f"SLURM unavailable: {reason}")
    cluster = LocalSlurm(root=Path(os.environ.get("LOPD_TEST_SLURM_ROOT", "/tmp/lopd-slurm-tests")), partitions=("debug", "gpu"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        print(cluster.stop(), file=sys.stderr)
        left = [p.name for p in (cluster.root / "run").glob("*.pid") if not p.name.endswith(".daemon.pid")]
        assert not left, f"daemons still recorded as running: {left}"


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> Path:
    from recipes.lightning_opd import write_tiny_inputs

    return write_tiny_inputs(str(tmp_path_factory.mktemp("tiny_inputs")))


@pytest.fixture(scope="session")
def nemorun_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nemorun_home")


def recipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "recipes.lightning_opd", *args]


def run_recipe(slurm_cluster: LocalSlurm | None, nemorun_home: Path, tiny_inputs: Path, *args: str, timeout: float = 900):
    env = launch_env({"NEMORUN_HOME": str(nemorun_home), "LOPD_TINY_INPUTS": str(tiny_inputs)},
                     base=slurm_cluster.env() if slurm_cluster else None)
    for var in ("LOPD_SLURM_ACCOUNT", "LOPD_SLURM_PARTITION"):  # the tests name their SLURM settings explicitly
        env.pop(var, None)
    t0 = time.monotonic()
    proc = subprocess.run(recipe_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.monotonic() - t0
    return proc


SLURM_EXECUTOR = ("run.executor=slurm", "run.executor.account=ci", "run.executor.gpus_per_node=None", "run.executor.time=00:30:00")


@pytest.fixture(scope="session")
def slurm_pipeline(slurm, tiny_inputs, nemorun_home, tmp_path_factory):
    """The whole tiny pipeline through the nemo-run recipe on SLURM: one job per stage, chained by
    afterok dependencies. Returns (work_dir, completed process, first job id of the run)."""
    work = tmp_path_factory.mktemp("slurm_pipeline") / "work"
    first = slurm.next_job_id()
    proc = run_recipe(slurm, nemorun_home, tiny_inputs, "--factory", "tiny", *SLURM_EXECUTOR, f"work_dir={work}", "--yes")
    print(f"tiny pipeline on SLURM: {proc.seconds:.0f} s, exit {proc.returncode}", file=sys.stderr)
    return work, proc, first


@pytest.fixture(scope="session")
def wrong_teacher_store(slurm_pipeline, tiny_inputs, tmp_path_factory) -> Path:
    """The pipeline's rollouts scored by another model (the base student) than the teacher that
    wrote the SFT data: a complete, valid store from an inconsistent teacher."""
    work, proc, _ = slurm_pipeline
    assert proc.returncode == 0
    out = tmp_path_factory.mktemp("wrong_teacher") / "store"
    score = subprocess.run(
        [str(VENV_BIN / "lopd"), "score", "--rollouts", str(work / "rollouts"), "--teacher", str(tiny_inputs / "student"),
         "--out", str(out), "--top-k", "4", "--backend", "hf", "--no-progress", "--shard", "0/1"],
        env=launch_env(), capture_output=True, text=True, timeout=600)
    assert score.returncode == 0, score.stderr[-2000:]
    return out


@pytest.fixture
def cancel_at_end(slurm):
    """Job ids appended here are cancelled when the test ends (a failed test leaves nothing queued)."""
    jobs: list[str] = []
    yield jobs
    slurm.cancel(*jobs)
