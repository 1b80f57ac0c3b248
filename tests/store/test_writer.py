"""StoreWriter: idempotent create, shard assignment, validation, crash-safe resume, concurrency."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.store import RecordError, StoreWriter, TeacherStore, finalize_store, synthetic_records, verify_store
from megatron_lopd.store.schema import ROOT_ATTR, SCHEMA_VERSION

from .conftest import PROV, VOCAB, child_env, make_store, spec


def _create(path, **over):
    kw = dict(num_sequences=40, top_k=4, vocab_size=VOCAB, provenance=dict(PROV), sequences_per_shard=8,
              has_rollout_logprobs=True, chunk_tokens=64)
    kw.update(over)
    return StoreWriter.create(path, **kw)


def test_create_is_idempotent_and_rejects_different_parameters(tmp_path):
    path = tmp_path / "s.zarr"
    w1 = _create(path)
    root_before = (path / "zarr.json").read_bytes()
    # A second worker (later, on another commit) opens the same store.
    w2 = _create(path, provenance={**PROV, "code_version": "other", "created_at": "later"})
    assert w2.meta.layout_key() == w1.meta.layout_key()
    assert (path / "zarr.json").read_bytes() == root_before  # only the creator wrote the root
    with pytest.raises(ArtifactError) as err:
        _create(path, top_k=8)
    assert "top_k: store has 4, requested 8" in str(err.value) and "overwrite=True" in err.value.fix
    with pytest.raises(ArtifactError, match="provenance.teacher_fingerprint: store has 'model-teacher'"):
        _create(path, provenance={**PROV, "teacher_fingerprint": "model-other"})
    w3 = _create(path, top_k=8, overwrite=True)
    assert w3.meta.top_k == 8
    attrs = json.loads((path / "zarr.json").read_text())["attributes"][ROOT_ATTR]
    assert attrs["complete"] is False and attrs["top_k"] == 8 and attrs["schema_version"] == SCHEMA_VERSION == 2


def test_create_rejects_bad_parameters_and_foreign_directories(tmp_path):
    with pytest.raises(ConfigError, match="top_k=5000 exceeds vocab_size"):
        _create(tmp_path / "a", top_k=5000)
    with pytest.raises(ConfigError, match="sequences_per_shard=0"):
        _create(tmp_path / "b", sequences_per_shard=0)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a teacher store"):
        _create(other)
    with pytest.raises(ArtifactError, match="not a teacher store"):
        StoreWriter.open(other)
    # A concurrent creator's root temp file (the moment before it publishes zarr.json) is not foreign.
    racing = tmp_path / "racing"
    racing.mkdir()
    (racing / ".zarr.json.4242.0badc0de.tmp").write_text("{}")
    assert _create(racing).meta.top_k == 4


def test_shard_ranges_and_worker_assignment(tmp_path):
    w = _create(tmp_path / "s.zarr", num_sequences=43, sequences_per_shard=8)
    ranges = w.shard_ranges()
    assert [(r.start, r.stop) for r in ranges] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 43)]
    assert [w.shard_of(i) for i in (0, 7, 8, 42)] == [0, 0, 1, 5]
    with pytest.raises(ConfigError):
        w.shard_of(43)
    parts = [w.pending_shards(worker=i, num_workers=4) for i in range(4)]
    assert parts == [[0, 4], [1, 5], [2], [3]]  # s % num_workers, deterministic
    assert sorted(sum(parts, [])) == list(range(6))
    with pytest.raises(ConfigError):
        w.pending_shards(worker=4, num_workers=4)


def test_write_shard_validates_with_global_index_and_writes_nothing_on_error(tmp_path):
    path, records = make_store(tmp_path / "s.zarr", finalize=False)
    w = StoreWriter.open(path)
    # Fresh store with the same data, shard 2 has a bad record at position 3 -> sequence 19.
    path2 = tmp_path / "t.zarr"
    w2 = _create(path2)
    shard = list(records[16:24])
    bad = shard[3].teacher_logprobs.copy()
    bad[0] = np.nan
    shard[3] = replace(shard[3], teacher_logprobs=bad)
    with pytest.raises(RecordError, match="sequence 19 .*invalid log-prob nan"):
        w2.write_shard(2, shard)
    assert not w2.is_done(2) and not (path2 / "shards" / "000002").exists()
    assert not list((path2 / "shards").glob(".tmp-*"))
    with pytest.raises(RecordError, match="holds sequences 16..23 \\(8\\), got 7 records"):
        w2.write_shard(2, records[16:23])
    # Rewriting a finished shard: identical content is a no-op, different content an error.
    marker = w.marker(1)
    assert w.write_shard(1, records[8:16]) == marker
    with pytest.raises(ArtifactError, match="shard 1 is already written with different content"):
        w.write_shard(1, records[0:8])


def test_finalize_refuses_missing_shards_then_completes(tmp_path):
    path, records = make_store(tmp_path / "s.zarr", finalize=False)
    marker = path / "markers" / "000003.json"
    marker.unlink()
    with pytest.raises(ArtifactError, match=r"1 of 5 shards have no done marker \(3\)"):
        finalize_store(path)
    w = StoreWriter.open(path)
    assert w.pending_shards() == [3]
    w.write_shard(3, records[24:32])
    summary = finalize_store(path)
    assert summary.complete and summary.num_sequences == 40
    assert summary.response_tokens == sum(len(r.response_ids) for r in records)
    assert finalize_store(path).response_tokens == summary.response_tokens  # idempotent
    with pytest.raises(ArtifactError, match="already complete"):
        StoreWriter.open(path)
    root = json.loads((path / "zarr.json").read_text())
    assert root["consolidated_metadata"]["metadata"]["shards/000003/topk_ids"]["node_type"] == "array"


# ---------------------------------------------------------------------------------------
# Crash safety with real SIGKILLed processes.

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from megatron_lopd.store import StoreWriter, synthetic_records
    from megatron_lopd.store import writer as writer_mod, format as format_mod
    sys.path.insert(0, {tests_dir!r})
    from conftest import PROV, VOCAB, spec

    path, worker, workers, kill_point = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    # Optional precise kill points (a real SIGKILL, delivered by the process to itself).
    if kill_point == "mid_arrays":  # after some arrays of the 2nd shard are in its temporary dir
        orig, calls = format_mod.write_token_array, [0]
        def patched(*a, **k):
            calls[0] += 1
            if calls[0] == 9:
                die()
            return orig(*a, **k)
        writer_mod.write_token_array = patched
    elif kill_point == "before_marker":  # shard renamed into place, marker not yet written
        orig_atomic, seen = writer_mod.atomic_write, [0]
        def patched(p, data, **kw):
            if "markers" in str(p):
                seen[0] += 1
                if seen[0] == 2:
                    die()
            return orig_atomic(p, data, **kw)
        writer_mod.atomic_write = patched
    elif kill_point == "marker_tmp":  # marker temporary written, not yet renamed
        orig_replace, seen = os.replace, [0]
        def patched(src, dst):
            if "markers" in str(dst):
                seen[0] += 1
                if seen[0] == 3:
                    die()
            return orig_replace(src, dst)
        writer_mod.os.replace = patched

    w = StoreWriter.create(path, num_sequences=NUM, top_k=4, vocab_size=VOCAB, provenance=PROV,
                           sequences_per_shard=SPS, has_rollout_logprobs=True, chunk_tokens=64)
    print("ready", flush=True)
    for s in w.pending_shards(worker=worker, num_workers=workers):
        r = w.shard_range(s)
        w.write_shard(s, synthetic_records(r, spec(4)))
        print("done", s, flush=True)
    """
)
NUM, SPS = 96, 8


def _child_script(tmp_path: Path) -> Path:
    script = tmp_path / "writer_child.py"
    text = _CHILD.format(tests_dir=str(Path(__file__).parent)).replace("NUM", str(NUM)).replace("SPS", str(SPS))
    script.write_text(text)
    return script


def _start(script, path, worker=0, workers=1, kill_point="none"):
    return subprocess.Popen([sys.executable, str(script), str(path), str(worker), str(workers), kill_point],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def _shard_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted((path / "shards").rglob("*"))
            if p.is_file() and "/.tmp-" not in str(p)}


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = TeacherStore.open(a), TeacherStore.open(b)
    assert len(sa) == len(sb) == NUM
    for i in range(NUM):
        ra, rb = sa[i], sb[i]
        for name in ("prompt_ids", "response_ids", "teacher_logprobs", "topk_ids", "topk_logprobs", "rollout_logprobs"):
            x, y = getattr(ra, name), getattr(rb, name)
            assert x.dtype == y.dtype and np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), (i, name)
        assert (ra.prompt_id, ra.sample_index) == (rb.prompt_id, rb.sample_index)
    assert _shard_files(a) == _shard_files(b)  # byte-identical shard files


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """The same store written by one uninterrupted writer (in-process)."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    w = StoreWriter.create(path, num_sequences=NUM, top_k=4, vocab_size=VOCAB, provenance=PROV,
                           sequences_per_shard=SPS, has_rollout_logprobs=True, chunk_tokens=64, fsync=False)
    for s in w.pending_shards():
        w.write_shard(s, synthetic_records(w.shard_range(s), spec(4)))
    finalize_store(path)
    return path


def _markers(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (path / "markers").glob("*.json")}


def _finish_and_compare(path, reference_store, done_before: dict[str, bytes]):
    """Resume in this process (the rerun after the kills) and compare with the reference."""
    w = StoreWriter.open(path, fsync=False)
    redone = set(w.pending_shards())
    for s in redone:
        w.write_shard(s, synthetic_records(w.shard_range(s), spec(4)))
    assert redone and not redone & {int(name[:6]) for name in done_before}  # finished shards are not redone
    assert all(_markers(path)[name] == blob for name, blob in done_before.items())
    finalize_store(path)
    assert verify_store(path).ok
    _assert_same_store(path, reference_store)


def test_sigkill_at_random_times_then_resume_gives_identical_store(tmp_path, reference_store):
    script = _child_script(tmp_path)
    path = tmp_path / "s.zarr"
    rng = np.random.default_rng(1234)
    for _ in range(2):
        proc = _start(script, path)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(float(rng.uniform(0.02, 0.4)))  # somewhere inside the shard loop
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert len(StoreWriter.open(path).done_shards()) < NUM // SPS
    _finish_and_compare(path, reference_store, _markers(path))


def test_sigkill_at_precise_points_then_resume(tmp_path, reference_store):
    """Killed while writing a shard's arrays, between rename and marker, and mid-marker."""
    script = _child_script(tmp_path)
    path = tmp_path / "s.zarr"
    for kill_point in ("mid_arrays", "before_marker", "marker_tmp"):
        before = StoreWriter.open(path).done_shards() if path.exists() else []
        proc = _start(script, path, kill_point=kill_point)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (kill_point, out, err)
        w = StoreWriter.open(path)
        done = w.done_shards()
        assert len(before) < len(done) < NUM // SPS, kill_point
        if kill_point == "before_marker":
            # The killed shard's directory is in place without a marker: still pending.
            assert (path / "shards" / f"{w.pending_shards()[0]:06d}").exists()
        if kill_point == "marker_tmp":
            assert list((path / "markers").glob(".*.tmp"))  # a half-published marker does not count
        with pytest.raises(ArtifactError, match="incomplete"):
            TeacherStore.open(path)
        with pytest.raises(ArtifactError, match="no done marker"):
            finalize_store(path)
    _finish_and_compare(path, reference_store, _markers(path))


def test_two_concurrent_writer_processes(tmp_path, reference_store):
    script = _child_script(tmp_path)
    path = tmp_path / "s.zarr"
    procs = [_start(script, path, worker=i, workers=2) for i in range(2)]  # both also race to create
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    written = [sorted(int(line.split()[1]) for line in o[0].splitlines() if line.startswith("done")) for o in outs]
    assert written[0] == list(range(0, NUM // SPS, 2)) and written[1] == list(range(1, NUM // SPS, 2))
    summary = finalize_store(path)
    assert summary.num_sequences == NUM
    _assert_same_store(path, reference_store)
