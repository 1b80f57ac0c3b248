"""training/run_dir.py and the trainer around it: a run dir is ours, one writer at a time, a
resume applies exactly what it records, SIGTERM checkpoints, and a finished run is left alone."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.training.config import resolve_config
from megatron_lopd.training.run_dir import check_run_dir, resume_changes
from tests.dist_utils import run_distributed
from tests.training.test_checkpointing import _command, _env, kill_tree
from tests.training.test_loop import _train_runs, opd_overrides, pipeline, read_metrics  # noqa: F401 (fixture)


def _config(**overrides):
    return resolve_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])


def test_run_dir_must_be_ours_and_not_an_input(tmp_path, tiny_hf_dir):
    store = tmp_path / "store"
    base = {"model.start_from": tiny_hf_dir, "data.store": store}
    check_run_dir(_config(run_dir=tmp_path / "new", **base))  # new: fine
    (tmp_path / "empty" / "logs").mkdir(parents=True)  # slurm/lightning_opd_8b.sh logs there before training
    check_run_dir(_config(run_dir=tmp_path / "empty", **base))
    with pytest.raises(ConfigError, match=rf"run_dir={tiny_hf_dir} overlaps model.start_from=.*never writes into its own inputs"):
        check_run_dir(_config(run_dir=tiny_hf_dir, **base))
    with pytest.raises(ConfigError, match="overlaps data.store"):
        check_run_dir(_config(run_dir=store / "run", **base))
    with pytest.raises(ConfigError, match="overlaps model.start_from"):  # the start checkpoint inside the run dir
        check_run_dir(_config(run_dir=Path(tiny_hf_dir).parent, **base))
    hf_copy = shutil.copytree(tiny_hf_dir, tmp_path / "hf_copy")
    with pytest.raises(ArtifactError, match=r"hf_copy is a Hugging Face model; training would overwrite its files"):
        check_run_dir(_config(run_dir=hf_copy, **base))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"notes is not a training run \(todo.txt\)"):
        check_run_dir(_config(run_dir=other, **base))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        check_run_dir(_config(run_dir=tmp_path / "file", **base))
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "manifest.json").write_text(json.dumps({"kind": "run", "extra": {"status": "running"}}))
    (ours / "config.json").write_text("{}")
    check_run_dir(_config(run_dir=ours, **base))


def write_checkpoint_meta(ckpt: Path, model: str = "tiny", **fields) -> None:
    """The part of a checkpoint's lopd_checkpoint.json that a resume's settings are checked against."""
    from megatron_lopd.models.qwen3 import named_config

    ckpt.mkdir(parents=True, exist_ok=True)
    meta = {"hf_config": named_config(model).to_hf_dict(), "tensor_parallel": 1, "pipeline_parallel": 1, "expert_parallel": 1,
            "optimizer_format": "fully_reshardable", **fields}
    (ckpt / "lopd_checkpoint.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_resume_changes_truth_table(tmp_path):
    base = dict(run_dir=tmp_path / "r", **{"model.start_from": tmp_path / "m", "data.store": tmp_path / "s"})
    recorded = _config(**base)
    inputs = {"start_fingerprint": "model-a", "teacher_fingerprint": "model-t", "rollouts_fingerprint": "data-r"}
    state = {"config": recorded.to_dict(), "inputs": inputs}
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000004"
    write_checkpoint_meta(ckpt)

    # Free: how long, cadence, logging, memory knobs, moved inputs with the same content.
    memory = {"data.micro_batch_size": 2, "data.micro_batch_tokens": 256, "model.recompute": "full", "optimizer.cpu_offload": "true",
              "optimizer.cpu_offload_fraction": 0.5, "optimizer.overlap_cpu_offload": "false", "optimizer.precision_aware": "true"}
    free = _config(**{**base, "train_steps": 400, "checkpoint.save_every": 7, "logging.log_every": 5, **memory,
                      "run_dir": tmp_path / "moved", "data.store": tmp_path / "store-copy"})
    changes = resume_changes(ckpt, state, free, inputs)
    assert changes["train_steps"][1] == 400 and changes["data.store"] == [str(tmp_path / "s"), str(tmp_path / "store-copy")]
    assert set(memory) <= set(changes)

    # Refused: optimizer.lr unless named; anything else always; inputs with other content.
    with pytest.raises(ConfigError, match=r"was trained with optimizer.lr=0.001, this run asks for 1e-05 .*"
                                          r"checkpoint.resume_changes=optimizer.lr to change it"):
        resume_changes(ckpt, state, _config(**{**base, "optimizer.lr": 1e-5}), inputs)
    lr = resume_changes(ckpt, state, _config(**{**base, "optimizer.lr": 1e-5, "checkpoint.resume_changes": "optimizer.lr"}), inputs)
    assert lr == {"optimizer.lr": [1e-3, 1e-5], "checkpoint.resume_changes": ["", "optimizer.lr"]}
    for key, value in (("data.seed", 7), ("loss", "topk_reverse_kl"), ("data.global_batch", 16), ("parallel.use_distributed_optimizer", "false")):
        with pytest.raises(ConfigError, match=rf"was trained with {key}=.*start a new run_dir with model.start_from={ckpt}"):
            resume_changes(ckpt, state, _config(**{**base, key: value}), inputs)
    with pytest.raises(ConfigError, match="checkpoint.resume_changes names data.seed, which a resume cannot change"):
        resume_changes(ckpt, state, _config(**{**base, "checkpoint.resume_changes": "data.seed"}), inputs)
    with pytest.raises(ConfigError, match="was trained on inputs with teacher_fingerprint=model-t, this run's inputs have model-u"):
        resume_changes(ckpt, state, recorded, {**inputs, "teacher_fingerprint": "model-u"})
    assert resume_changes(ckpt, {}, free, inputs) == {}  # an older checkpoint records nothing to compare (warned)


def test_layout_changes_on_resume_follow_the_optimizer_format(tmp_path):
    """TP / PP / EP / expert TP may change on resume when the checkpoint's optimizer state is
    fully_reshardable; from a dp_reshardable one (what checkpoints without a recorded format hold)
    only where its per-rank buffers do not depend on them (EP and expert TP of a dense model)."""
    base = dict(run_dir=tmp_path / "r", **{"model.start_from": tmp_path / "m", "data.store": tmp_path / "s"})
    recorded = _config(**base)
    state = {"config": recorded.to_dict(), "inputs": {}}
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000004"

    layout = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2, "parallel.expert_parallel": 2,
              "parallel.expert_tensor_parallel": 2}
    write_checkpoint_meta(ckpt, "qwen3_30b_a3b", expert_tensor_parallel=1)
    assert resume_changes(ckpt, state, _config(**base, **layout), {}) == {k: [1, 2] for k in layout}

    write_checkpoint_meta(ckpt, optimizer_format=None)  # no optimizer_format: dp_reshardable
    experts = {"parallel.expert_parallel": 2, "parallel.expert_tensor_parallel": 2}
    assert resume_changes(ckpt, state, _config(**base, **experts), {}) == {k: [1, 2] for k in experts}
    for key, asked in (("parallel.tensor_parallel", "TP=2 PP=1"), ("parallel.pipeline_parallel", "TP=1 PP=2")):
        with pytest.raises(ConfigError) as err:
            resume_changes(ckpt, state, _config(**base, **{key: 2}), {})
        assert str(err.value) == (
            f"{ckpt}: its optimizer state (dp_reshardable) reshards over data parallel only; it was saved at TP=1 PP=1, "
            f"this run asks for {asked} (fix: resume with parallel.tensor_parallel=1 parallel.pipeline_parallel=1 "
            "(checkpoints written with checkpoint.optimizer_format=fully_reshardable resume at any layout))")
    # An MoE checkpoint from before expert TP was configurable (nor recorded): megatron-core used expert TP = TP.
    write_checkpoint_meta(ckpt, "qwen3_30b_a3b", tensor_parallel=2, optimizer_format="dp_reshardable")
    moe_state = {"config": _config(**base, **{"parallel.tensor_parallel": 2}).to_dict(), "inputs": {}}
    del moe_state["config"]["parallel"]["expert_tensor_parallel"]
    same = {"parallel.tensor_parallel": 2, "parallel.expert_tensor_parallel": 2}
    assert resume_changes(ckpt, moe_state, _config(**base, **same), {}) == {"parallel.expert_tensor_parallel": [None, 2]}
    with pytest.raises(ConfigError, match=r"saved at TP=2 PP=1 EP=1 ETP=2, this run asks for TP=2 PP=1 EP=1 ETP=1 \(fix: resume with "
                                          r"parallel.tensor_parallel=2 parallel.pipeline_parallel=1 parallel.expert_parallel=1 "
                                          r"parallel.expert_tensor_parallel=2 \(checkpoints written"):
        resume_changes(ckpt, moe_state, _config(**base, **{"parallel.tensor_parallel": 2}), {})


def _wait_for(predicate, proc, log: Path, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended early:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_one_writer_sigterm_checkpoint_and_truthful_resumes(pipeline, tmp_path):
    """Real processes: a second trainer on a live run dir is refused; SIGTERM to torchrun (2 ranks)
    checkpoints the current step on both ranks and exits non-zero; resumes apply only what they
    may and record it; a finished run asked again changes nothing."""
    run_dir = tmp_path / "run"
    long_run = opd_overrides(pipeline, run_dir, train_steps=100000, **{"data.global_batch": 4})
    log = tmp_path / "a.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(_command(2, long_run), env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(read_metrics(run_dir)) >= 2, first, log)
        holder = json.loads((run_dir / ".lopd.lock").read_text())["pid"]
        second = subprocess.run(_command(1, long_run), env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"error: run dir {run_dir} is in use by pid {holder} on " in second.stderr
        assert [line for line in second.stderr.splitlines() if "error" in line.lower()] == [second.stderr.strip().splitlines()[-1]]
        first.send_signal(signal.SIGTERM)  # what SLURM sends on preemption / scontrol requeue
        rc = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            kill_tree(first)
            first.wait()
    text = log.read_text()
    assert rc != 0 and "received SIGTERM: checkpointing after the current step" in text, text[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stopped = manifest["extra"]["final_step"]
    assert manifest["extra"]["status"] == "interrupted" and manifest["extra"]["stop_signal"] == "SIGTERM"
    assert f"training stopped by SIGTERM at step {stopped} of 100000" in text
    assert text.count("error: training stopped by SIGTERM") == 1  # one rank prints the line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped + 1))
    assert not (run_dir / ".lopd.lock").exists()  # released on the way out

    # Resumes in one process (DP 2 -> 1, allowed). Free change (train_steps) first, then a
    # refused lr change, then the lr change named in checkpoint.resume_changes; then the
    # finished run again: nothing trained, nothing rewritten.
    n1, n2 = stopped + 2, stopped + 4
    resume = lambda **kw: opd_overrides(pipeline, run_dir, **{"data.global_batch": 4, **kw})  # noqa: E731
    hf_dir = tmp_path / "hf_model"
    shutil.copytree(pipeline["student"], hf_dir)
    hf_config = (hf_dir / "config.json").read_bytes()
    runs = [
        resume(train_steps=n1),
        resume(train_steps=n2, **{"optimizer.lr": 1e-3}),
        resume(train_steps=n2, **{"data.seed": 99}),
        resume(train_steps=n2, **{"optimizer.lr": 1e-3, "checkpoint.resume_changes": "optimizer.lr"}),
        resume(train_steps=n2, **{"optimizer.lr": 1e-3, "checkpoint.resume_changes": "optimizer.lr"}),
        opd_overrides(pipeline, hf_dir, train_steps=1),  # a Hugging Face model dir as run_dir
        opd_overrides(pipeline, pipeline["student"], train_steps=1),  # the start model as run_dir
    ]
    snapshot = {}

    got = run_distributed(_train_runs, world_size=1, runs=runs[:4])[0]
    assert "error" not in got[0], got[0]
    assert sorted(got[0]["losses"]) == [stopped + 1, stopped + 2]
    assert got[1]["error"].startswith("ConfigError: ") and "was trained with optimizer.lr=0.003, this run asks for 0.001" in got[1]["error"]
    assert "checkpoint.resume_changes=optimizer.lr" in got[1]["error"]
    assert "was trained with data.seed=1234, this run asks for 99" in got[2]["error"]
    assert "error" not in got[3], got[3]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, n2 + 1))
    assert {r["lr"] for r in rows if r["step"] <= n1} == {3e-3} and {r["lr"] for r in rows if r["step"] > n1} == {1e-3}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["extra"]["status"] == "complete" and manifest["params"]["optimizer"]["lr"] == 1e-3
    resumes = manifest["extra"]["resumes"]
    assert [r["step"] for r in resumes] == [stopped, n1]
    assert resumes[0]["changes"]["train_steps"] == [100000, n1] and resumes[1]["changes"]["optimizer.lr"] == [3e-3, 1e-3]
    assert json.loads((run_dir / "config.json").read_text())["optimizer"]["lr"] == 1e-3
    ckpt = json.loads((run_dir / "checkpoints" / f"step_{n2:07d}" / "lopd_checkpoint.json").read_text())
    assert ckpt["trainer"]["config"]["optimizer"]["lr"] == 1e-3 and ckpt["trainer"]["inputs"]["teacher_fingerprint"]

    for name in ("manifest.json", "config.json", "metrics.jsonl"):
        snapshot[name] = ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns)
    got = run_distributed(_train_runs, world_size=1, runs=runs[4:])[0]
    assert "error" not in got[0] and got[0]["losses"] == {}, got[0]
    for name, (data, mtime) in snapshot.items():
        assert (run_dir / name).read_bytes() == data and (run_dir / name).stat().st_mtime_ns == mtime, name
    assert "is a Hugging Face model; training would overwrite its files" in got[1]["error"]
    assert (hf_dir / "config.json").read_bytes() == hf_config and not (hf_dir / "metrics.jsonl").exists()
    assert "overlaps model.start_from" in got[2]["error"]
