"""Never lose or misstate data (issue 12), generation and scoring: --overwrite deletes only what
the tool wrote, two scorers split a store's shards, NaN models are refused naming the model,
file-system faults are one line, and every file is written 0644 (the umask's mode)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lopd.cli import main
from megatron_lopd.artifacts import ArtifactWriter, RolloutArtifact
from megatron_lopd.provenance import Manifest
from megatron_lopd.store import StoreWriter, TeacherStore, verify_store
from tests.store.fs_faults import tmpfs


def _gen_args(model, prompts, out, *extra):
    return ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--backend", "hf",
            "--max-tokens", "12", "--chunk-size", "4", "--no-progress", *extra]


def _score_args(rollouts, teacher, out, *extra):
    return ["score", "--rollouts", str(rollouts), "--teacher", str(teacher), "--out", str(out), "--backend", "hf",
            "--top-k", "4", "--sequences-per-shard", "1", "--no-progress", *extra]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, argv, *needles):
    """`lopd ARGV` exits 2 with exactly one error line holding every needle (progress bars before it are dropped)."""
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr().err
    lines = [line for line in out.splitlines() if line.startswith("lopd ")]
    assert len(lines) == 1 and "Traceback" not in out, out
    err = lines[0]
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def nan_model(tiny_hf_dir, tmp_path_factory):
    """The tiny student with a NaN final norm: every logit is NaN."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("nan") / "nan_model"
    shutil.copytree(tiny_hf_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["model.norm.weight"][:] = np.nan
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------------ --overwrite (item 1)
def test_overwrite_deletes_only_what_the_tool_wrote(tiny_hf_dir, tiny_teacher_dir, prompt_file, hf_rollouts, tmp_path, capsys):
    # An HF export (its manifest.json is of kind hf_export) as --out of `lopd generate --overwrite`.
    export = tmp_path / "export"
    shutil.copytree(tiny_hf_dir, export)
    Manifest(kind="hf_export", fingerprint="x", producer={}, inputs={}, params={}).write(export)
    before = _tree(export)
    _refused(capsys, _gen_args(tiny_hf_dir, prompt_file, export, "--overwrite"), "--overwrite refused", f"{export} is not a rollout artifact", "manifest.json", "nothing was deleted")
    assert _tree(export) == before
    # A user's directory tree as --out of `lopd score --overwrite`.
    user = tmp_path / "user"
    (user / "papers").mkdir(parents=True)
    (user / "papers" / "draft.tex").write_text("years of work")
    _refused(capsys, _score_args(hf_rollouts.path, tiny_teacher_dir, user, "--overwrite"), "--overwrite refused", f"{user} is not a teacher store", "papers")
    assert (user / "papers" / "draft.tex").read_text() == "years of work"
    # What the tools wrote is overwritten.
    ro, store = tmp_path / "ro", tmp_path / "store"
    assert main(_gen_args(tiny_hf_dir, prompt_file, ro)) == 0
    (ro / "stray.txt").write_text("inside the artifact")
    assert main(_gen_args(tiny_hf_dir, prompt_file, ro, "--overwrite", "--seed", "3")) == 0
    assert not (ro / "stray.txt").exists() and RolloutArtifact.open(ro).manifest.params["seed"] == 3
    assert main(_score_args(ro, tiny_teacher_dir, store)) == 0
    assert main(_score_args(ro, tiny_teacher_dir, store, "--overwrite", "--top-k", "2")) == 0
    assert TeacherStore.open(store).top_k == 2
    # The CLI names its flag, not the Python keyword.
    err = _refused(capsys, _score_args(ro, tiny_teacher_dir, store, "--top-k", "3"), "different parameters", "--overwrite to rescore")
    assert "overwrite=True" not in err
    # The Python API keeps working (demo/task.py): overwrite=True on an artifact.
    art = RolloutArtifact.open(ro)
    records = list(art)
    plan = json.loads((ro / "plan.json").read_text())
    w = ArtifactWriter.create(ro, plan, overwrite=True)
    assert w.done_chunks() == set() and not (ro / "manifest.json").exists()
    for c in range(len(w.ranges)):
        w.write_chunk(c, records[c * 4 * art.n:min((c + 1) * 4, art.num_prompts) * art.n])
    assert w.finalize().fingerprint == art.fingerprint


# ------------------------------------------------------------------------ file modes
def test_every_file_gets_the_regular_file_mode(hf_rollouts, tiny_hf_dir, prompt_file, tmp_path):
    files = [p for p in hf_rollouts.path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
    old = os.umask(0o027)
    try:
        assert main(_gen_args(tiny_hf_dir, prompt_file, tmp_path / "g")) == 0
    finally:
        os.umask(old)
    chunks = list((tmp_path / "g" / "chunks").glob("*.safetensors"))
    assert chunks and {oct(p.stat().st_mode & 0o777) for p in chunks} == {oct(0o640)}


# ------------------------------------------------------------------------ NaN models (item 10)
def test_nan_generator_and_teacher_are_refused_naming_the_model(nan_model, tiny_hf_dir, prompt_file, hf_rollouts, tmp_path, capsys):
    out = tmp_path / "sft"
    _refused(capsys, _gen_args(nan_model, prompt_file, out, "--kind", "sft_data"), f"model {nan_model} produced non-finite logits", "--backend hf", "check the model's weights")
    assert not list(out.glob("chunks/*.safetensors")) and not (out / "manifest.json").exists()
    store = tmp_path / "store"
    _refused(capsys, _score_args(hf_rollouts.path, nan_model, store), f"teacher {nan_model} returned non-finite log-probs", "store sequence 0")
    assert not list((store / "markers").glob("*.json"))


# ------------------------------------------------------------------------ two scorers (item 6)
def _lopd() -> list[str]:
    script = Path(sys.executable).with_name("lopd")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]


_HOLD = """
import sys
from megatron_lopd.store import StoreWriter
StoreWriter.open(sys.argv[1]).claim_shard(int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()
"""


def test_two_scorers_split_a_store_and_skip_held_shards(hf_rollouts, tiny_teacher_dir, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, ref)) == 0
    capsys.readouterr()
    num_shards = len(hf_rollouts)
    # Two real scorers on one store, started together: each shard is written by exactly one of them.
    both = tmp_path / "both"
    procs = [subprocess.Popen(_lopd() + _score_args(hf_rollouts.path, tiny_teacher_dir, both), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    scored = [int(o.split(": ")[1].split(" shards scored")[0]) for o, _ in outs]
    assert sum(scored) == num_shards, outs  # nothing written twice, nothing left out
    pids = {json.loads(m.read_text())["pid"] for m in (both / "markers").glob("*.json")}
    assert pids <= {p.pid for p in procs}
    assert verify_store(both).ok and TeacherStore.open(both).content_hashes() == TeacherStore.open(ref).content_hashes()
    assert not list((both / "markers").glob("*.lock"))
    # A shard held by a live process is skipped with a log line; the store is not finalized.
    held = tmp_path / "held"
    StoreWriter.create(held, num_sequences=num_shards, top_k=4, vocab_size=TeacherStore.open(ref).vocab_size,
                       provenance=TeacherStore.open(ref).provenance, sequences_per_shard=1,
                       has_rollout_logprobs=hf_rollouts.has_logprobs)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(held), "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run(_lopd() + _score_args(hf_rollouts.path, tiny_teacher_dir, held), env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"{num_shards - 1} shards scored, 1 skipped (held by another scorer)" in r.stdout and "not finalized" in r.stdout
        assert f"shard 2 is being written by pid {holder.pid}" in r.stderr
        assert not (held / "markers" / "000002.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its holder died: the rerun takes the lock over (with a warning), scores it and finalizes.
    r = subprocess.run(_lopd() + _score_args(hf_rollouts.path, tiny_teacher_dir, held), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "1 shards scored" in r.stdout and "complete" in r.stdout, r.stdout + r.stderr
    assert "taking over a stale lock" in r.stderr and f"pid {holder.pid}" in r.stderr
    assert TeacherStore.open(held).content_hashes() == TeacherStore.open(ref).content_hashes()


# ------------------------------------------------------------------------ file-system faults (item 13)
def test_unwritable_outputs_are_one_line_before_any_model_loads(tiny_hf_dir, tiny_teacher_dir, prompt_file, hf_rollouts,
                                                               tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with tmpfs(tmp_path / "ro", size_kb=64, read_only=True) as ro:
        _refused(capsys, _gen_args(tiny_hf_dir, prompt_file, ro / "out"), f"{ro / 'out'}", "Read-only file system", "--out")
        _refused(capsys, _score_args(hf_rollouts.path, tiny_teacher_dir, ro / "store"), f"{ro / 'store'}", "Read-only file system", "--out")
    for cmd in (_gen_args(tiny_hf_dir, prompt_file, tmp_path / "afile"),
                _score_args(hf_rollouts.path, tiny_teacher_dir, tmp_path / "afile")):
        _refused(capsys, cmd, f"{tmp_path / 'afile'} is a file, not a directory")
    for cmd in (_gen_args(tiny_hf_dir, prompt_file, tmp_path / "afile" / "sub"),
                _score_args(hf_rollouts.path, tiny_teacher_dir, tmp_path / "afile" / "sub")):
        _refused(capsys, cmd, f"{tmp_path / 'afile' / 'sub'}", "Not a directory")
    # Misleading hints: a file is not reported as a missing directory.
    _refused(capsys, _gen_args(tmp_path / "afile", prompt_file, tmp_path / "o"), "is a file, not a model directory")
    _refused(capsys, _score_args(tmp_path / "afile", tiny_teacher_dir, tmp_path / "s"), "is a file, not a rollout artifact directory")
    _refused(capsys, _gen_args(tiny_hf_dir, tmp_path, tmp_path / "o"), "is a directory without .jsonl, .json, .parquet files")
    # A disk that fills up after the checks: the chunk write fails as one line, no partial file is left.
    with tmpfs(tmp_path / "full", size_kb=64, fill=True, leave_kb=8) as full:
        _refused(capsys, _gen_args(tiny_hf_dir, prompt_file, full / "out", "--max-tokens", "100", "--n", "4"), "No space left on device")
        assert not [p for p in (full / "out").rglob("*") if p.is_file() and p.name != "plan.json"]
