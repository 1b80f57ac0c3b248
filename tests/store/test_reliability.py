"""Never lose or misstate data (issue 12), the store's part: --overwrite deletes only a store,
one writer per shard (real processes), the fast file check, inspect reports missing pieces,
and file-system faults as one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.runtime.files import LockedError
from megatron_lopd.store import (
    ChecksumError,
    StoreProvenance,
    StoreWriter,
    check_store_files,
    finalize_store,
    inspect_store,
    synthetic_records,
    verify_store,
)
from tests.store.conftest import PROV, VOCAB, child_env, lopd, make_store, spec
from tests.store.fs_faults import tmpfs


def _create(path, n=40, sps=8, k=4, **kw):
    return StoreWriter.create(path, num_sequences=n, top_k=k, vocab_size=VOCAB, provenance=StoreProvenance(**PROV),
                              sequences_per_shard=sps, has_rollout_logprobs=True, chunk_tokens=64, fsync=False, **kw)


def _user_tree(root: Path) -> Path:
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "thesis.tex").write_text("years of work")
    (root / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ overwrite (item 1, 13)
def test_overwrite_deletes_only_a_teacher_store(tmp_path):
    user = _user_tree(tmp_path / "user")  # a plain zarr group too: not a teacher store
    before = _tree(user)
    with pytest.raises(ArtifactError, match=r"--overwrite refused: .*user is not a teacher store .*notes.*nothing was deleted"):
        _create(user, overwrite=True, overwrite_flag="--overwrite")
    assert _tree(user) == before
    with pytest.raises(ArtifactError, match=r"a zarr hierarchy but not a teacher store"):
        _create(user)  # without --overwrite: refused too
    (user / "zarr.json").unlink()
    with pytest.raises(ArtifactError, match=r"exists and is not a teacher store \(it holds notes\) .*choose an empty or new"):
        _create(user)
    assert (user / "notes" / "thesis.tex").read_text() == "years of work"
    # A file where the store directory belongs.
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a directory"):
        _create(tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "x"
    # A real store is deleted and recreated empty; the flag the user typed is named in every hint.
    store, _ = make_store(tmp_path / "s.zarr", n=16, finalize=False)
    with pytest.raises(ArtifactError, match=r"different parameters: .*or --overwrite to rescore"):
        _create(store, n=16, sps=4, overwrite_flag="--overwrite")
    with pytest.raises(ArtifactError, match=r"or overwrite=True to rescore"):
        _create(store, n=16, sps=4)
    w = _create(store, n=16, sps=4, overwrite=True)
    assert w.meta.sequences_per_shard == 4 and w.done_shards() == []
    assert not list((store / "shards").glob("0*"))


def test_overwrite_refuses_a_store_a_live_writer_holds(tmp_path):
    store, records = make_store(tmp_path / "s.zarr", n=16, finalize=False)
    holder = _holder_process(store, shard=1)
    try:
        with pytest.raises(LockedError, match=rf"--overwrite refused: .*being written by pid {holder.pid}"):
            _create(store, n=16, overwrite=True, overwrite_flag="--overwrite")
        assert len(StoreWriter.open(store).done_shards()) == 2
    finally:
        holder.kill()
        holder.wait()
    _create(store, n=16, overwrite=True)  # the holder is dead: its lock no longer protects the store
    assert StoreWriter.open(store).done_shards() == []


# ------------------------------------------------------------------------ one writer per shard (item 6)
_HOLD = """
import sys
from megatron_lopd.store import StoreWriter
w = StoreWriter.open(sys.argv[1])
w.claim_shard(int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()
"""


def _holder_process(store: Path, shard: int) -> subprocess.Popen:
    """A real second process that holds shard ``shard``'s writer lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(store), str(shard)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def test_one_writer_per_shard_and_stale_takeover(tmp_path, caplog):
    n, sps = 24, 8
    records = synthetic_records(range(n), spec())
    store = tmp_path / "s.zarr"
    w = _create(store, n=n, sps=sps)
    holder = _holder_process(store, shard=1)
    lock = store / "markers" / "000001.lock"
    try:
        info = json.loads(lock.read_text())
        assert info["pid"] == holder.pid and info["host"]
        with pytest.raises(LockedError, match=rf"shard 1 is being written by pid {holder.pid} on "):
            w.write_shard(1, records[8:16])
        with pytest.raises(LockedError, match=rf"pid {holder.pid}"):
            w.claim_shard(1)
        assert not w.is_done(1) and not list((store / "shards").glob("*000001*"))  # nothing written
        w.write_shard(0, records[0:8])  # other shards are free
        w.write_shard(2, records[16:24])
        assert not (store / "markers" / "000000.lock").exists()  # released after writing
        with pytest.raises(ArtifactError, match="1 of 3 shards have no done marker"):
            finalize_store(store)  # finalize needs every marker
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        w.write_shard(1, records[8:16])  # the holder died: its lock is taken over, with a warning
    assert any("taking over a stale lock" in r.getMessage() and str(holder.pid) in r.getMessage() for r in caplog.records)
    assert json.loads((store / "markers" / "000001.json").read_text())["pid"] == os.getpid()
    assert not lock.exists()
    summary = finalize_store(store)
    assert summary.complete and verify_store(store).ok


def test_concurrent_finalizers_are_refused(tmp_path):
    store, _ = make_store(tmp_path / "s.zarr", n=16, finalize=False)
    code = ("import sys; from megatron_lopd.runtime.files import OutputLock; "
            "l = OutputLock(sys.argv[1] + '/.lopd.lock', 'x').acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"\(finalize\).* is in use by pid {holder.pid}"):
            finalize_store(store)
    finally:
        holder.kill()
        holder.wait()
    assert finalize_store(store).complete


# ------------------------------------------------------------------------ fast file check (item 9)
def _token_file(store: Path, shard: int, array: str) -> Path:
    (f,) = [p for p in (store / "shards" / f"{shard:06d}" / array / "c").rglob("*") if p.is_file()]
    return f


def test_check_store_files_finds_every_damage(tmp_path):
    src, _ = make_store(tmp_path / "src.zarr", n=24, sps=8)
    stats = check_store_files(src)
    assert stats.shards == 3 and stats.chunks > 3 * 5 and stats.bytes_read > 0 and stats.files > 0
    assert check_store_files(src, checksums=False).bytes_read == 0

    def damaged(name, damage):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        damage(dst)
        return dst

    def flip(path: Path, at: int):
        data = bytearray(path.read_bytes())
        data[at] ^= 0x40
        path.write_bytes(bytes(data))

    cases = {
        "flip-chunk": (lambda d: flip(_token_file(d, 1, "topk_logprobs"), 10),
                       ChecksumError, r"array 'topk_logprobs' of shard 1: checksum error in inner chunk 0"),
        "flip-index": (lambda d: flip(_token_file(d, 2, "response_ids"), -6),
                       ChecksumError, r"array 'response_ids' of shard 2: checksum error in the shard index"),
        "flip-per-seq": (lambda d: flip(d / "shards" / "000000" / "prompt_id" / "c" / "0", 8),
                         ChecksumError, r"array 'prompt_id' of shard 0: checksum error in chunk"),
        "flip-sequences": (lambda d: flip(d / "sequences" / "response_lens" / "c" / "0", 8),
                           ChecksumError, r"sequences/response_lens: checksum error"),
        "truncated": (lambda d: os.truncate(_token_file(d, 0, "teacher_logprobs"), 20),
                      ArtifactError, r"shard 0: file shards/000000/teacher_logprobs/c/0 is 20 bytes, its marker says"),
        "no-marker": (lambda d: (d / "markers" / "000001.json").unlink(),
                      ArtifactError, r"shard 1: done marker markers/000001.json is missing"),
        "no-shard-dir": (lambda d: shutil.rmtree(d / "shards" / "000002"),
                         ArtifactError, r"shard 2: shard directory shards/000002 is missing"),
        "no-array-meta": (lambda d: (d / "shards" / "000000" / "topk_ids" / "zarr.json").unlink(),
                          ArtifactError, r"shards/000000/topk_ids/zarr.json is missing"),
    }
    for name, (damage, exc, pattern) in cases.items():
        dst = damaged(name, damage)
        with pytest.raises(exc, match=pattern):
            check_store_files(dst)
        assert not verify_store(dst).ok, name  # the full check agrees
    unfinished, _ = make_store(tmp_path / "unfinished.zarr", n=16, finalize=False)
    with pytest.raises(ArtifactError, match="is not complete .2 of 2 shards done, not finalized"):
        check_store_files(unfinished)
    assert check_store_files(unfinished, require_complete=False).shards == 2
    r = lopd("store", "check", str(tmp_path / "flip-chunk"))
    assert r.returncode != 0 and "checksum error in inner chunk 0" in r.stderr and "Traceback" not in r.stderr
    r = lopd("store", "check", str(src))
    assert r.returncode == 0 and r.stdout.startswith(f"OK {src}: 3 shards"), r.stdout + r.stderr


# ------------------------------------------------------------------------ inspect (item 12)
def test_inspect_reports_missing_markers_and_shard_dirs(tmp_path):
    src, _ = make_store(tmp_path / "src.zarr", n=24, sps=8)
    ok = lopd("store", "inspect", str(src))
    assert ok.returncode == 0 and "yes (3/3 shards done)" in ok.stdout
    no_marker = tmp_path / "no-marker"
    shutil.copytree(src, no_marker)
    (no_marker / "markers" / "000001.json").unlink()
    s = inspect_store(no_marker)
    assert not s.complete and s.shards_done == 2 and s.problems == ["shard 1: done marker markers/000001.json is missing"]
    r = lopd("store", "inspect", str(no_marker))
    assert r.returncode == 1 and "complete       no: DAMAGED (2/3 shards present)" in r.stdout
    assert "markers/000001.json is missing" in r.stdout and "yes" not in r.stdout.splitlines()[1]
    no_dir = tmp_path / "no-dir"
    shutil.copytree(src, no_dir)
    shutil.rmtree(no_dir / "shards" / "000002")
    s = inspect_store(no_dir)
    assert not s.complete and s.shards_done == 2
    assert s.problems == ["shard 2: shard directory shards/000002 is missing (its marker exists)"]
    r = lopd("store", "inspect", "--json", str(no_dir))
    assert r.returncode == 1 and json.loads(r.stdout)["problems"] == s.problems
    # An unfinished store: missing markers are normal, a marker without its directory is not.
    partial, _ = make_store(tmp_path / "partial.zarr", n=24, sps=8, finalize=False)
    (partial / "markers" / "000000.json").unlink()
    s = inspect_store(partial)
    assert s.problems == [] and s.shards_done == 2 and not s.complete
    shutil.rmtree(partial / "shards" / "000001")
    assert inspect_store(partial).problems == ["shard 1: shard directory shards/000001 is missing (its marker exists)"]


# ------------------------------------------------------------------------ file-system faults (item 13)
def test_full_disk_while_writing_a_shard_is_one_line(tmp_path):
    records = synthetic_records(range(16), spec())
    with tmpfs(tmp_path / "mnt", size_kb=128) as mnt:
        w = _create(mnt / "s.zarr", n=16)
        w.write_shard(0, records[:8])
        with tmpfs(mnt / "s.zarr" / "shards", size_kb=64, fill=True):  # the shards' file system is full now
            with pytest.raises(ArtifactError, match=r"s.zarr: cannot write shard 1 .*No space left on device .*free space"):
                w.write_shard(1, records[8:])
            assert not w.is_done(1) and not list((mnt / "s.zarr" / "shards").glob(".tmp-*"))


def test_missing_and_file_paths_are_named_for_what_they_are(tmp_path):
    (tmp_path / "f").write_text("x")
    for path, needle in ((tmp_path / "nope", "not a teacher store (it does not exist)"),
                         (tmp_path / "f", "not a teacher store (a file, not a directory)"),
                         (tmp_path, "not a teacher store (no zarr.json)")):
        with pytest.raises(ArtifactError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            inspect_store(path)
        r = lopd("store", "inspect", str(path))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
