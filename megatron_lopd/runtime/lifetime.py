"""Child processes die with their parent: no orphaned engines holding memory or a GPU.

vLLM starts its engine core (and, with tensor parallelism, worker processes) through
`multiprocessing` (spawn or fork, `VLLM_WORKER_MULTIPROC_METHOD`). vLLM's workers watch
their parent (a pipe), but the engine core does not: a SIGKILLed `lopd score` left it
running (2.3 GB here; on a GPU node it holds the GPU and blocks the resume).

`children_die_with_parent()` wraps the target of every `multiprocessing` process started
inside it, so that the child, first thing:

- sets ``PR_SET_PDEATHSIG`` to SIGKILL (Linux; only when the starting thread is the main
  thread, because the kernel fires it when that *thread* exits): the kernel kills the
  child the moment its parent dies, even by SIGKILL;
- exits at once if its parent is already gone (the race between fork and prctl);
- runs a daemon thread that polls its parent pid every 0.5 s and exits when it changes
  (other platforms, children of non-main threads);
- wraps its own children the same way, so the whole tree goes with the root.

With the spawn method this happens while the child unpickles its process object, before
the target (whose unpickling imports vLLM: seconds) is loaded. Normal shutdown is
unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def _set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died: nothing here is worth finishing


def die_with_parent(parent_pid: int, pdeathsig: bool = True) -> None:
    """In a child process: die when `parent_pid` (this process's parent) dies."""
    if pdeathsig:
        _set_pdeathsig()
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="lopd-parent-watch", daemon=True).start()


def _arm(parent_pid: int, pdeathsig: bool, check_parent: bool) -> bool:
    """In the child: die with the parent, and wrap this child's own children the same way."""
    # forkserver children are the fork server's, not the starter's: watch whoever is the parent now.
    die_with_parent(parent_pid if check_parent else os.getppid(), pdeathsig)
    _install()
    return True


class _Arm:
    """Unpickled (spawn) before the target, whose unpickling imports vLLM (seconds): arms the child first."""

    def __init__(self, parent_pid: int, pdeathsig: bool, check_parent: bool):
        self.args = (parent_pid, pdeathsig, check_parent)

    def __reduce__(self):
        return _arm, self.args


class _DieWithParent:
    """A picklable process target: `die_with_parent`, then the original target."""

    def __init__(self, arm, target):
        self.arm = arm  # an `_Arm` in the parent (and after fork); True once armed in a spawned child
        self.target = target

    def __reduce__(self):
        return _DieWithParent, (self.arm, self.target)  # the arm first: it runs while the child unpickles

    def __call__(self, *args, **kwargs):
        if isinstance(self.arm, _Arm):  # fork: nothing was unpickled
            self.arm = _arm(*self.arm.args)
        return self.target(*args, **kwargs)


_original_start = multiprocessing.process.BaseProcess.start
_depth = 0
_depth_lock = threading.Lock()


def _start(self):
    target = getattr(self, "_target", None)
    if target is not None and not isinstance(target, _DieWithParent):
        method = getattr(self, "_start_method", None) or multiprocessing.get_start_method(allow_none=True) or "fork"
        arm = _Arm(os.getpid(), threading.current_thread() is threading.main_thread(), method != "forkserver")
        self._target = _DieWithParent(arm, target)
    return _original_start(self)


def _install() -> None:
    multiprocessing.process.BaseProcess.start = _start


@contextlib.contextmanager
def children_die_with_parent():
    """Every `multiprocessing` process started inside (and its descendants) dies with its parent."""
    global _depth
    with _depth_lock:
        _depth += 1
        _install()
    try:
        yield
    finally:
        with _depth_lock:
            _depth -= 1
            if _depth == 0:
                multiprocessing.process.BaseProcess.start = _original_start


def descendants(pid: int) -> set[int]:
    """Pids of every live descendant of `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


__all__ = ["children_die_with_parent", "die_with_parent", "descendants"]
