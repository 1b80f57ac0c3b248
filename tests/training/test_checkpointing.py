"""Checkpoints: atomic `latest`, exact resume (also after a real SIGKILL), another DP size.

Exactness: on CPU in fp32 a resumed run recomputes the same floating-point operations in
the same order as the uninterrupted one, so per-step losses are compared bitwise (==) at
an unchanged layout. Resuming at another data-parallel size changes how the global batch
is split and summed; those losses are compared with a relative tolerance of 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.training.checkpointing import LATEST_NAME, find_latest
from tests.dist_utils import run_distributed
from tests.training.test_loop import _train_runs, opd_overrides, pipeline, read_metrics  # noqa: F401 (fixture)

BIN = Path(sys.executable).parent


def test_latest_marker_and_partial_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_latest(root) is None
    (root / "step_0000004").mkdir(parents=True)
    (root / "step_0000004" / "lopd_checkpoint.json").write_text("{}")
    (root / "step_0000008.partial").mkdir()  # a save cut short by a kill: never "latest"
    assert find_latest(root) is None  # no marker yet: nothing complete was published
    (root / LATEST_NAME).write_text("step_0000004\n")
    assert find_latest(root) == root / "step_0000004"
    (root / LATEST_NAME).write_text("step_0000012\n")
    with pytest.raises(ArtifactError, match="names step_0000012, which is missing or incomplete"):
        find_latest(root)


def losses(run_dir) -> dict[int, float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "one metrics line per step"
    return {r["step"]: r["loss"] for r in rows}


def test_resume_from_a_checkpoint_is_exact(pipeline, tmp_path):
    """In one launch: a 6-step run saving every 3 steps, then a new run dir resumed from step 3."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    runs = [
        opd_overrides(pipeline, full, **{"train_steps": 6, "checkpoint.save_every": 3, "checkpoint.keep_last": 0}),
        opd_overrides(pipeline, resumed, **{"train_steps": 6, "checkpoint.resume": full / "checkpoints" / "step_0000003"}),
    ]
    a, b = run_distributed(_train_runs, world_size=1, runs=runs)[0]
    assert "error" not in a and "error" not in b, (a, b)
    assert sorted(b["losses"]) == [4, 5, 6]
    assert all(b["losses"][s] == a["losses"][s] for s in (4, 5, 6)), (a["losses"], b["losses"])
    meta = json.loads((full / "checkpoints" / "step_0000003" / "lopd_checkpoint.json").read_text())
    assert meta["trainer"]["data"]["consumed"] == 24 and meta["trainer"]["optimizer_updates"] == 3
    assert meta["kind"] == "training" and meta["tensor_parallel"] == 1 and (full / "checkpoints" / "step_0000003" / "tokenizer").is_dir()


# --------------------------------------------------------------------------------------
# Real processes, real SIGKILL.

STEPS, SAVE_EVERY = 24, 4


def _command(nproc: int, overrides: list[str]) -> list[str]:
    train = ["train", "--config", "tiny_cpu", *overrides]
    if nproc == 1:
        return [str(BIN / "lopd"), *train]
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", str(BIN / "lopd"), *train]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_to_completion(nproc: int, overrides: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        rc = subprocess.run(_command(nproc, overrides), env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode
    assert rc == 0, log.read_text()[-4000:]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started (torchrun puts its workers in their
    own sessions, so killing its process group alone would leave them running)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # Not the launcher itself: psutil would reap it and Popen would then report exit code 0.
    psutil.wait_procs(family[1:], timeout=30)


def run_and_kill(nproc: int, overrides: list[str], run_dir: Path, log: Path, *, after_checkpoint: int) -> int:
    """Start `lopd train`, SIGKILL its whole process group once a checkpoint of step >=
    `after_checkpoint` exists and a later step was logged; returns the last logged step."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(_command(nproc, overrides), env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                assert proc.poll() is None, "the run finished before it could be killed:\n" + log.read_text()[-3000:]
                latest = (run_dir / "checkpoints" / LATEST_NAME)
                step = int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0
                if step >= after_checkpoint and len(read_metrics(run_dir)) > step:
                    break
                time.sleep(0.02)
            kill_tree(proc)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                kill_tree(proc)
                proc.wait()
    return max(losses(run_dir))


@pytest.fixture(scope="module")
def uninterrupted(pipeline, tmp_path_factory):
    """The reference runs, at one process and at two (DP=2), every checkpoint kept."""
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"uninterrupted_{nproc}")
        overrides = opd_overrides(pipeline, run_dir, **{"train_steps": STEPS, "checkpoint.save_every": SAVE_EVERY, "checkpoint.keep_last": 0})
        run_to_completion(nproc, overrides, run_dir.with_name(run_dir.name + ".log"))
        out[nproc] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(pipeline, uninterrupted, tmp_path, nproc):
    run_dir = tmp_path / "run"
    overrides = opd_overrides(pipeline, run_dir, **{"train_steps": STEPS, "checkpoint.save_every": SAVE_EVERY, "checkpoint.keep_last": 2})
    log = tmp_path / "log.txt"
    last_logged = run_and_kill(nproc, overrides, run_dir, log, after_checkpoint=8)
    resumed_at = int(find_latest(run_dir / "checkpoints").name.split("_")[1])
    assert 8 <= resumed_at < last_logged < STEPS  # killed mid-run, with steps after the checkpoint to redo
    run_to_completion(nproc, overrides, log)  # the same command resumes (checkpoint.resume=auto)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{resumed_at:07d}'} at step {resumed_at}" in log.read_text()
    got, want = losses(run_dir), losses(uninterrupted[nproc])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bitwise, every step: those before the kill and those redone after it
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == [f"step_{STEPS - SAVE_EVERY:07d}", f"step_{STEPS:07d}"]  # keep_last=2, no partial left


def _resume_elsewhere(overrides: list[str]):
    return _train_runs([overrides])[0]


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resume_with_another_data_parallel_size(pipeline, uninterrupted, tmp_path, saved, resumed):
    """A DP=2 checkpoint continues at DP=1 and vice versa: same global batches, same losses (rtol 1e-5)."""
    ckpt = uninterrupted[saved] / "checkpoints" / "step_0000008"
    overrides = opd_overrides(pipeline, tmp_path / "run", **{"train_steps": STEPS, "checkpoint.save_every": 0, "checkpoint.resume": ckpt})
    result = run_distributed(_resume_elsewhere, world_size=resumed, overrides=overrides)[0]
    assert "error" not in result, result
    want = losses(uninterrupted[saved])
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(9, STEPS + 1))
    assert got == pytest.approx({s: want[s] for s in got}, rel=1e-5, abs=1e-6)
    meta = json.loads((ckpt / "lopd_checkpoint.json").read_text())
    assert meta["data_parallel"] == saved


def test_sigkill_of_the_trainer_leaves_no_checkpoint_writer(pipeline, tmp_path):
    """dist_checkpointing keeps a manager process (and forks writers while saving): a SIGKILL of
    `lopd train` alone, as a node's OOM killer or a user would send it, must take them along."""
    from megatron_lopd.runtime.files import _pid_alive
    from megatron_lopd.runtime.lifetime import descendants

    run_dir, log = tmp_path / "run", tmp_path / "log"
    overrides = opd_overrides(pipeline, run_dir, train_steps=100000, **{"checkpoint.save_every": 1, "checkpoint.keep_last": 1,
                                                                         "data.global_batch": 4})
    with open(log, "ab") as out:
        proc = subprocess.Popen(_command(1, overrides), env=_env(), stdout=out, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not children:  # the checkpoint manager exists once the first save started
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            if find_latest(run_dir / "checkpoints") is not None:
                children = descendants(proc.pid)
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the parent only, not its process group
        assert proc.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while (alive := {p for p in children if _pid_alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"survivors of the killed trainer: {alive}"
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
