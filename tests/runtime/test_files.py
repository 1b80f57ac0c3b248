"""runtime/files.py: output locks (live, dead, requeued and silent holders), writable-output
checks, deletion only of what is proven ours, one-line OS errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.runtime.files import (
    LOCK_NAME,
    LockedError,
    OutputLock,
    atomic_write,
    check_writable_dir,
    os_error_line,
    remove_owned_dir,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_dead_ones(tmp_path, caplog, monkeypatch):
    path = tmp_path / LOCK_NAME
    # A live holder in another process: refused, naming pid and host.
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; from megatron_lopd.runtime.files import OutputLock; "
                               f"OutputLock({str(path)!r}, 'run dir').acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"run dir {tmp_path} is in use by pid {holder.pid} on "):
            OutputLock(path, "run dir").acquire()
    finally:
        holder.kill()
        holder.wait()
    # ... which died without releasing it (SIGKILL): the next writer takes over, with a warning.
    assert json.loads(path.read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"), OutputLock(path, "run dir") as lock:
        assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over a stale lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert not path.exists()  # released

    # A requeued SLURM job (same job id, higher restart count) takes over its earlier life's lock,
    # even from another host; a different job on another host with a fresh heartbeat is refused.
    other = {"host": "node-that-died", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": 0, "started": "x"}
    path.write_text(json.dumps(other))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with OutputLock(path, "run dir"):
        pass
    path.write_text(json.dumps({**other, "slurm_job_id": "78"}))
    with pytest.raises(LockedError, match="in use by pid 1 on node-that-died, SLURM job 78"):
        OutputLock(path, "run dir").acquire()
    # ... until its heartbeat is older than stale_after_s.
    old = time.time() - 120
    os.utime(path, (old, old))
    with OutputLock(path, "run dir", stale_after_s=60) as lock:
        assert lock.held
    # A dead pid on this host: stale at once.
    path.write_text(json.dumps({**other, "host": os.uname().nodename, "pid": _dead_pid(), "slurm_job_id": None}))
    assert OutputLock(path, "x").try_acquire() is None


def test_lock_heartbeat_renews_the_file(tmp_path):
    lock = OutputLock(tmp_path / LOCK_NAME, "x", stale_after_s=0.4).acquire()
    try:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 1.0
    finally:
        lock.release()


def test_writable_dir_checks_before_work(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b", "eval output", "--out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"eval output --out .*/file is a file, not a directory \(fix: pass a directory path to --out\)"):
        check_writable_dir(tmp_path / "file", "eval output", "--out")
    with pytest.raises(ArtifactError, match=r"Not a directory \(fix: a file stands where a directory is expected"):
        check_writable_dir(tmp_path / "file" / "sub", "eval output", "--out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a read-only file system instead
            ro = "/sys/fs"  # sysfs refuses root too
        with pytest.raises(ArtifactError, match=r"(Permission denied|Read-only file system)"):
            check_writable_dir(ro, "store", "--out")
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert not [p for p in (tmp_path / "a" / "b").iterdir()]  # the probe is gone


def test_remove_owned_dir_deletes_only_what_is_ours(tmp_path):
    user = tmp_path / "user"
    (user / "deep").mkdir(parents=True)
    (user / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"--overwrite refused: .*/user is not a teacher store \(it holds deep, manifest.json\)"):
        remove_owned_dir(user, lambda p: (p / "zarr.json").is_file(), "teacher store")
    assert (user / "deep").is_dir() and (user / "manifest.json").is_file()
    ours = tmp_path / "ours"
    (ours / "shards").mkdir(parents=True)
    (ours / "zarr.json").write_text("{}")
    (ours / LOCK_NAME).write_text("{}")  # the caller's own lock stays
    assert remove_owned_dir(ours, lambda p: (p / "zarr.json").is_file(), "teacher store")
    assert [p.name for p in ours.iterdir()] == [LOCK_NAME]
    assert not remove_owned_dir(tmp_path / "missing", lambda p: True, "x")


def test_atomic_write_and_os_error_lines(tmp_path):
    atomic_write(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644 and len(list(tmp_path.iterdir())) == 1
    line = os_error_line(OSError(errno.ENOSPC, "No space left on device"), "runs/eval")
    assert line == "writing under runs/eval: No space left on device (fix: free space on that file system or write elsewhere)"
    line = os_error_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file/y"))
    assert line.startswith("/x/file/y: Not a directory (fix: a file stands where a directory is expected")
