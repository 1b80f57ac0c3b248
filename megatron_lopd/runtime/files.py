"""File-system safety shared by every stage: one writer per output, writable outputs checked
before work, deletion only of what we can prove we wrote, and one-line OS errors.

- `OutputLock`: an advisory lock file in an output directory naming its holder (host, pid,
  SLURM job). A second `lopd train` on one run dir, or two scorers on one store shard, are
  refused while the holder lives. A lock is stale, and taken over with a warning, when its
  holder is provably gone: same host and the pid is dead; the same SLURM job at an earlier
  restart (a requeued job); or no heartbeat for `stale_after_s` (another host that died).
  O_EXCL creation works on NFS v3+ and Lustre, where `flock` may not.
- `check_writable_dir`: create the directory if needed and write a probe file, so an
  unwritable `--out` fails in one line before hours of work, not after.
- `remove_owned_dir`: `--overwrite` deletes a directory only if a predicate proves it is an
  artifact of the expected kind; anything else is refused naming what was found.
- `os_error_line`: a full disk, a read-only file system or a file where a directory is
  expected, as one line naming the path and the fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from megatron_lopd.errors import ArtifactError, LopdError

log = logging.getLogger(__name__)

LOCK_NAME = ".lopd.lock"


def regular_file_mode() -> int:
    """The mode `open()` gives a new file here: 0o666 less the umask (read without changing it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: its entries, i.e. renames into it, are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Write to a private temporary beside ``path`` and rename it over ``path``; the file gets
    the regular mode (never a temporary's 0600). ``fsync``: the data and the rename survive a
    node crash too (SIGKILL safety does not need it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, regular_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)


# ----------------------------------------------------------------------------- locks
def publish_once(path: str | os.PathLike, data: bytes | str) -> bool:
    """Create ``path`` holding ``data`` unless it exists, atomically and exclusively: of several
    processes publishing at once exactly one wins (True); the others find it there (False) and
    compare. Not `atomic_write`, which replaces. The temporary starts with `.<name>.`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def refuse_foreign_dir(path: Path, what: str, fix: str, ignore: Callable[[str], bool] = lambda name: name.startswith(".")) -> None:
    """An existing directory that holds anything (but ``ignore``d names) is not ours to write in:
    raise "``what`` (it holds a, b, ...)"."""
    others = sorted(p.name for p in path.iterdir() if not ignore(p.name)) if path.is_dir() else []
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise ArtifactError(f"{what} (it holds {shown})", fix)


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) holds nothing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def describe_holder(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


class OutputLock:
    """One writer per output. Use as a context manager or call `acquire()` / `release()`.

    `what` names the output in messages ("run dir", "store shard 3"). `stale_after_s`: a lock
    held from another host whose heartbeat (the file's mtime, touched every
    `stale_after_s / 4`) is older than this is taken over.
    """

    def __init__(self, path: str | os.PathLike, what: str, *, stale_after_s: float = 600.0, heartbeat: bool = True):
        self.path = Path(path)
        self.what = what
        self.stale_after_s = stale_after_s
        self.heartbeat = heartbeat
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: judged by its age alone

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock's holder is gone, or None if it may still be alive."""
        me = _holder()
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == me["pid"]:
                return None
            return None if _pid_alive(holder["pid"]) else f"its holder (pid {holder['pid']}) is dead"
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"] \
                and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]:
            return f"it was taken by an earlier run of this SLURM job (restart {holder.get('slurm_restart_count')})"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if age > self.stale_after_s:
            return f"its holder has not renewed it for {age:.0f} s (> {self.stale_after_s:.0f} s)"
        return None

    def try_acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns None on success, else the live holder's record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            # Created with its content in one step (publish_once): a holder killed while taking the
            # lock never leaves an empty lock file that would look alive until stale_after_s.
            if not publish_once(self.path, json.dumps(_holder())):
                holder = self.read_holder()
                if holder is None:
                    continue  # released meanwhile
                reason = self.stale_reason(holder)
                if reason is None:
                    return holder
                # Rename first: of several processes taking over one stale lock, one rename wins.
                grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:6]}")
                try:
                    os.rename(self.path, grave)
                except FileNotFoundError:
                    continue
                grave.unlink(missing_ok=True)
                log.warning("%s: taking over a stale lock (%s): %s", self.what, describe_holder(holder), reason)
                continue
            self.held = True
            if self.heartbeat:
                self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
                self._thread.start()
            return None
        return self.read_holder() or {}

    def acquire(self) -> "OutputLock":
        holder = self.try_acquire()
        if holder is not None:
            raise LockedError(
                f"{self.what} {self.path.parent} is in use by {describe_holder(holder)} (lock {self.path})",
                "wait for that process to finish or stop it; a lock of a dead process is taken over automatically",
            )
        return self

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_after_s / 4, 0.05)):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.read_holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class LockedError(LopdError):
    """Another live process writes the same output."""


# ----------------------------------------------------------------------------- outputs
def check_writable_dir(path: str | os.PathLike, what: str, flag: str | None = None) -> Path:
    """Create ``path`` (and parents) if needed and prove it writable with a probe file."""
    path = Path(path)
    name = f"{what} {flag} {path}" if flag else f"{what} {path}"
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{name} is a file, not a directory", f"pass a directory path{f' to {flag}' if flag else ''}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lopd-write-probe.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise ArtifactError(f"{name}: {os_error_reason(exc)}", os_error_fix(exc)) from None
    return path


def remove_owned_dir(path: str | os.PathLike, is_ours: Callable[[Path], bool], kind: str, flag: str = "--overwrite") -> bool:
    """Delete ``path`` for `flag` only if ``is_ours(path)`` proves it is a `kind`; an empty
    directory is kept. Returns True if something was deleted."""
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise ArtifactError(f"{flag}: {path} is a file, not a {kind}", "choose another output path; nothing was deleted")
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if not entries:
        return False
    if not is_ours(path):
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (" ..." if len(entries) > 5 else "")
        raise ArtifactError(
            f"{flag} refused: {path} is not a {kind} (it holds {shown})",
            "check the output path; only a directory this tool wrote is ever deleted, nothing was deleted")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return True


# ----------------------------------------------------------------------------- OS errors
_FIXES = {
    errno.ENOSPC: "free space on that file system or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "choose a directory you can write, or fix its permissions",
    errno.EPERM: "choose a directory you can write, or fix its permissions",
    errno.ENOTDIR: "a file stands where a directory is expected: remove it or choose another path",
    errno.EISDIR: "a directory stands where a file is expected: choose another path",
    errno.EEXIST: "something already exists there: choose another path",
    errno.ENOENT: "check the path",
}


def os_error_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def os_error_fix(exc: OSError) -> str:
    return _FIXES.get(exc.errno, "check the path and the file system")


def os_error_line(exc: OSError, output: str | os.PathLike | None = None) -> str:
    """`PATH: reason (fix: ...)` for an OSError raised anywhere in a stage. A write into an open
    file reports no path (a full disk): then `output`, the command's output, is named."""
    if exc.filename is not None:
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    else:
        where = f"writing under {output}" if output else "a file operation"
    return f"{where}: {os_error_reason(exc)} (fix: {os_error_fix(exc)})"
