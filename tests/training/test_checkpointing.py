"""Checkpoints: atomic `latest`, exact resume (also after a real SIGKILL), another DP / TP / PP
size, the older dp_reshardable optimizer format, and Transformer Engine's FP8 extra state.

Exactness: on CPU in fp32 a resumed run recomputes the same floating-point operations in
the same order as the uninterrupted one, so per-step losses are compared bitwise (==) at
an unchanged layout. Resuming at another data-parallel size changes how the global batch
is split and summed; those losses are compared with a relative tolerance of 1e-5. Another
TP / PP size also splits the matmuls and vocabulary reductions: rel 1e-5 or abs 2e-6, as
test_loop compares TP=2 / PP=2 with TP=1 (the loss is a sum of terms of both signs).
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
from megatron_lopd.models import checkpoint as mckpt
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


# --------------------------------------------------------------------------------------
# Another TP / PP layout, the older optimizer format, FP8 extra state.


def _train_runs_then_in_the_old_format(runs: list[list[str]], old_runs: list[list[str]]):
    """`runs`, then `old_runs` as the previous version wrote them: the optimizer state
    dp_reshardable and no optimizer_format in the metadata (removed after each run)."""
    out = _train_runs(runs)
    for overrides in old_runs:
        out += _train_runs([overrides])
        run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
        if os.environ["RANK"] == "0":  # the other rank waits for it at the next run's rendezvous
            for meta_path in (run_dir / "checkpoints").glob("step_*/lopd_checkpoint.json"):
                meta = json.loads(meta_path.read_text())
                assert meta.pop("optimizer_format") == "dp_reshardable"
                meta_path.write_text(json.dumps(meta))
    return out


def _train_runs_seeing_te_guard(runs: list[list[str]]):
    """`_train_runs` with Transformer Engine taken as installed; records the guard variable as
    every `Module.load_state_dict` (where TE unpickles FP8 extra state) sees it."""
    import torch

    seen: list = []
    load_state_dict = torch.nn.Module.load_state_dict

    def recording(module, *args, **kwargs):
        seen.append(os.environ.get(mckpt.TE_UNSAFE_PICKLE_ENV))
        return load_state_dict(module, *args, **kwargs)

    mckpt._te_installed = lambda: True
    torch.nn.Module.load_state_dict = recording
    return _train_runs(runs), seen, os.environ.get(mckpt.TE_UNSAFE_PICKLE_ENV)


@pytest.mark.slow
def test_resume_at_another_tensor_or_pipeline_layout(pipeline, tmp_path):
    """TP=2 and PP=2 runs (2 ranks) checkpoint at step 3 and continue at TP=1 / PP=1 (1 rank):
    the losses of steps 4-6 are those of an uninterrupted TP=1 run (checkpoint.optimizer_format=
    fully_reshardable). A dp_reshardable checkpoint (the default; here as the previous version
    wrote it, without a recorded format) resumes exactly at its own layout and is refused at another one;
    every model load of a resume or start runs with TE's FP8 pickle opt-in set, and only then."""
    steps, saved = 6, "step_0000003"
    run = lambda name, **kw: opd_overrides(pipeline, tmp_path / name, **{"train_steps": steps, **kw})  # noqa: E731
    reshardable = {"checkpoint.save_every": 3, "checkpoint.keep_last": 0, "checkpoint.optimizer_format": "fully_reshardable"}
    tp2 = run("tp2", **{"parallel.tensor_parallel": 2, **reshardable})
    pp2 = run("pp2", **{"parallel.pipeline_parallel": 2, "data.micro_batch_size": 1, **reshardable})
    old = opd_overrides(pipeline, tmp_path / "old", train_steps=3, **{"parallel.tensor_parallel": 2, "checkpoint.save_every": 3})
    old_resumed = run("old_resumed", **{"parallel.tensor_parallel": 2, "checkpoint.resume": tmp_path / "old" / "checkpoints" / saved})
    got_tp2, got_pp2, _, got_old = run_distributed(_train_runs_then_in_the_old_format, world_size=2, runs=[tp2, pp2],
                                                   old_runs=[old, old_resumed])[0]
    assert all("error" not in r for r in (got_tp2, got_pp2, got_old)), (got_tp2, got_pp2, got_old)
    assert {s: got_old["losses"][s] for s in (4, 5, 6)} == {s: got_tp2["losses"][s] for s in (4, 5, 6)}  # bitwise
    meta = json.loads((tmp_path / "tp2" / "checkpoints" / saved / "lopd_checkpoint.json").read_text())
    assert meta["optimizer_format"] == "fully_reshardable" and meta["tensor_parallel"] == 2

    runs, seen, after = run_distributed(_train_runs_seeing_te_guard, world_size=1, runs=[
        run("ref"),
        run("tp1", **{"checkpoint.resume": tmp_path / "tp2" / "checkpoints" / saved}),
        run("pp1", **{"checkpoint.resume": tmp_path / "pp2" / "checkpoints" / saved}),
        run("refused", **{"checkpoint.resume": tmp_path / "old" / "checkpoints" / saved}),
        run("started", train_steps=1, **{"model.start_from": tmp_path / "tp2" / "checkpoints" / saved,
                                         "teacher_consistency.allow_policy_mismatch": "true"}),
    ])[0]
    ref, tp1, pp1, refused, started = runs
    assert all("error" not in r for r in (ref, tp1, pp1, started)), runs
    for resumed in (tp1, pp1):
        assert sorted(resumed["losses"]) == [4, 5, 6]
        assert resumed["losses"] == pytest.approx({s: ref["losses"][s] for s in (4, 5, 6)}, rel=1e-5, abs=2e-6)
    resumes = json.loads((tmp_path / "tp1" / "manifest.json").read_text())["extra"]["resumes"]
    assert resumes[0]["changes"]["parallel.tensor_parallel"] == [2, 1]
    assert refused["error"] == (
        f"ConfigError: {tmp_path / 'old' / 'checkpoints' / saved}: its optimizer state (dp_reshardable) reshards over data "
        "parallel only; it was saved at TP=2 PP=1, this run asks for TP=1 PP=1 (fix: resume with parallel.tensor_parallel=2 "
        "parallel.pipeline_parallel=1 (checkpoints written with checkpoint.optimizer_format=fully_reshardable resume at any layout))")
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    # Three loads (two resumes, one start from a training checkpoint), each through one or more
    # load_state_dict calls, all with the opt-in; none left set afterwards.
    assert len(seen) >= 3 and set(seen) == {"1"} and after is None, (seen, after)


def test_te_extra_state_guard_is_scoped_to_the_load(monkeypatch):
    """The opt-in is set inside the guard only, the previous value (or its absence) comes back
    after it, also when the load fails; without TE installed nothing is touched."""
    env = mckpt.TE_UNSAFE_PICKLE_ENV
    monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(mckpt, "_te_installed", lambda: False)
    with mckpt.trusted_te_extra_state():
        assert env not in os.environ
    monkeypatch.setattr(mckpt, "_te_installed", lambda: True)
    with mckpt.trusted_te_extra_state():
        assert os.environ[env] == "1"
    assert env not in os.environ
    with pytest.raises(RuntimeError, match="load failed"), mckpt.trusted_te_extra_state():
        assert os.environ[env] == "1"
        raise RuntimeError("load failed")
    assert env not in os.environ
    for users_value in ("0", "1"):
        monkeypatch.setenv(env, users_value)
        with pytest.raises(RuntimeError), mckpt.trusted_te_extra_state():
            assert os.environ[env] == "1"
            raise RuntimeError
        assert os.environ[env] == users_value
