"""The process side of the code sandbox (started by `megatron_lopd.evaluation.sandbox`).

`python -S -B -P sandbox_launcher.py serve FD [MODULE ...]` is the sandbox's fork server:
started once, it imports the modules named (so programs need not), then for every request
on the socket FD (the program's stdin, stdout, stderr and status pipe as SCM_RIGHTS) forks
a *launcher*, replies with its pid, and reaps it (and any orphan of it) when it ends. When
the evaluator goes (the socket closes) it kills the launchers still running and exits.
Standard library only (the package is not importable in here); the environment is the
sandbox's minimal one.

A launcher reads from its stdin a 20-byte ASCII length and that many bytes of JSON (the
*spec*: the program's source, limits, whether to isolate, the directories to hide); the
rest of stdin is the program's, and the program's stdout and stderr are the launcher's.
One JSON object per line goes to the status pipe: `{"setup_error": "..."}` when the
sandbox could not be built, else `{"exit_code": int | None, "signal": int | None,
"cpu_s": float}` for the program.

Isolated, the process tree under the fork server is

    launcher   a process group of its own; in new user, mount, network and IPC namespaces,
               whose capabilities it holds
      init     pid 1 of a new pid namespace: mounts its /proc, reaps, reports the program's end
        program  unprivileged (see `_drop_privileges`), with resource limits

The launcher is invisible from inside the pid namespace, so the program cannot signal it, and
the evaluator is further out still. When init exits the kernel kills everything left in the
pid namespace, so nothing the program started outlives it.

Unisolated (the explicit opt-in where namespaces are unavailable) the launcher forks the
program directly, in the directory the spec names.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import gc
import importlib
import json
import os
import resource
import signal
import socket
import sys
import threading
import types

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (the unified syscall table)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

WORK_ROOT = "/tmp"  # isolated: a fresh size-limited tmpfs replaces the host's /tmp here
WORKDIR = "/tmp/work"  # the program's cwd and HOME when isolated
SANDBOX_UID = 1  # isolated as root: the program's uid inside the user namespace (mapped to spec["sandbox_uid"])

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The sandbox could not be built (reported as a setup error, never as the program's fault)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {fstype or source} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path: str, *, set_: int = 0, clear: int = 0, recursive: bool) -> None:
    attr = _MountAttr(set_, clear, 0, 0)
    long = ctypes.c_long  # syscall() is variadic: integers must be passed as full longs
    flags = AT_RECURSIVE if recursive else 0
    result = _libc.syscall(long(SYS_MOUNT_SETATTR), long(AT_FDCWD), path.encode(), long(flags), ctypes.byref(attr), long(ctypes.sizeof(attr)))
    _check(result, f"mount_setattr {path} (Linux >= 5.12 is needed for a read-only view of the filesystem)")


def _write_file(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise SetupError(f"write {path}: {exc.strerror}") from None


def _read_exact(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise SetupError(f"stdin ended {left} bytes before the end of the sandbox spec")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _report(status_fd: int, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(status_fd, data) :]


# ---------------------------------------------------------------------------------------
# Namespaces and the filesystem view


def _enter_namespaces(sandbox_uid: int) -> None:
    """New user, mount, network, IPC and pid namespaces (pid: for the next child), with
    the user namespace's id maps written. As root, inner uid 0 stays the launcher's
    (kuid 0, needed to build the mounts) and SANDBOX_UID maps to `sandbox_uid`: only a
    process whose real uid is not root is held to RLIMIT_NPROC. A root process cannot
    write that map for its own new namespace, so a helper forked beforehand (still in
    the parent namespace) writes it."""
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        _check(_libc.unshare(flags), "unshare (user, mount, network, pid namespaces)")
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1\n")
        _write_file("/proc/self/gid_map", f"0 {gid} 1\n")
        return
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    launcher = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(done_r)
        message = b"ok"
        if os.read(go_r, 1):
            try:
                maps = f"0 0 1\n{SANDBOX_UID} {sandbox_uid} 1\n"
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{launcher}/{name}", "w") as f:
                        f.write(maps)
            except OSError as exc:
                message = f"write the user namespace's id maps ({exc.strerror})".encode()
        os.write(done_w, message)
        os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        _check(_libc.unshare(flags), "unshare (user, mount, network, pid namespaces)")
        os.write(go_w, b"1")
        message = os.read(done_r, 4096).decode()
    finally:
        os.close(go_w)
        os.waitpid(helper, 0)
        os.close(done_r)
    if message != "ok":
        raise SetupError(message)


def _build_filesystem_view(hidden_dirs: list[str], workdir_kb: int, isolated_as_root: bool) -> None:
    """Everything read-only and nosuid; the hidden directories (homes, /run, ...) replaced by
    empty read-only tmpfs, except the Python installation where it lies inside one; /tmp a
    fresh writable tmpfs of `workdir_kb`, the only writable place. Mounts made here are
    private to this namespace and vanish with it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    visible = sorted({os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))})
    if WORK_ROOT in visible:  # it would have to stay visible, and it becomes writable
        raise SetupError(f"Python is installed at {WORK_ROOT} itself: install it elsewhere")
    for hidden in [*hidden_dirs, WORK_ROOT]:
        keep = [v for v in visible if v == hidden or v.startswith(hidden.rstrip("/") + "/")]
        if hidden in keep or not os.path.isdir(hidden):
            continue
        handles = [(v, os.open(v, os.O_PATH | os.O_CLOEXEC)) for v in keep]  # before the tmpfs covers them
        options = f"size={workdir_kb}k,mode=1777" if hidden == WORK_ROOT else "size=64k,mode=0755"
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, options)
        for path, fd in handles:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    _mount_setattr("/", set_=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, recursive=True)
    _mount_setattr(WORK_ROOT, clear=MOUNT_ATTR_RDONLY, recursive=False)
    os.mkdir(WORKDIR, 0o700)
    if isolated_as_root:
        os.chown(WORKDIR, SANDBOX_UID, SANDBOX_UID)
    os.chdir(WORKDIR)


# ---------------------------------------------------------------------------------------
# The program


def _set_limits(limits: dict) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value) if name != "RLIMIT_CPU" else (value, value + 1))


def _drop_privileges(isolated: bool, as_root: bool) -> None:
    """Leave the program no capability over the namespaces the launcher built (else it could
    unmount the tmpfs that hides a home, or remount the filesystem writable), and no way to
    gain one: as root, become SANDBOX_UID (a setuid drops every capability); otherwise
    (already inner root of the launcher's user namespace) move into a nested user namespace,
    whose capabilities own nothing. no_new_privs then keeps setuid binaries from helping."""
    if isolated and as_root:
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    elif isolated:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare (nested user namespace)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _run_program(spec: dict) -> int:
    """Run the source as `python program.py` would (in this already started interpreter, as
    a fresh `__main__`); return its exit status."""
    main = types.ModuleType("__main__")
    main.__dict__.update(__builtins__=builtins, __file__="program.py")
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    try:
        exec(compile(spec["source"], "program.py", "exec"), main.__dict__)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        kind, value, tb = sys.exc_info()
        value = value.with_traceback(tb.tb_next)  # the traceback from the program's own frames on
        sys.excepthook(kind, value, tb.tb_next)
        return 1
    return 0


def _program_child(spec: dict, status_fd: int, as_root: bool) -> None:
    """In the forked child: limits, privileges, then the program; exits, never returns.
    `as_root`: the evaluator is root (outside the user namespace, where it counts)."""
    os.close(status_fd)
    limits = dict(spec["limits"])
    if spec["isolate"] and not as_root and "RLIMIT_NPROC" in limits:
        limits["RLIMIT_NPROC"] += 2  # the launcher and init count too, under the same uid
    try:
        _set_limits(limits)
        _drop_privileges(spec["isolate"], as_root)
    except (OSError, SetupError) as exc:
        print(f"sandbox: could not restrict the program: {exc}", file=sys.stderr)
        os._exit(125)
    status = _run_program(spec)
    # What an interpreter exit does for a program (its threads joined, its atexit functions
    # run, output flushed), without tearing down the fork server's whole interpreter.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # as Python exits when it cannot flush stdout
    os._exit(status)


def _wait_report(pid: int, status_fd: int) -> None:
    """Reap `pid` (and, as init, every orphan), then report how it ended."""
    while True:
        try:
            reaped, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return
        if reaped == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    _report(status_fd, {
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    })


def launch(status_fd: int) -> None:
    """One program: its spec from stdin, the sandbox around it, the program in a forked child."""
    length = int(_read_exact(0, 20))
    spec = json.loads(_read_exact(0, length))
    os.environ.update(spec["environment"])
    as_root = os.getuid() == 0
    try:
        if spec["isolate"]:
            _enter_namespaces(spec["sandbox_uid"])
            _build_filesystem_view(spec["hidden_dirs"], spec["workdir_kb"], as_root)
        else:
            os.chdir(spec["workdir"])
    except (OSError, SetupError) as exc:
        _report(status_fd, {"setup_error": str(exc)})
        return
    if not spec["isolate"]:
        child = os.fork()
        if child == 0:
            _program_child(spec, status_fd, as_root)
        _wait_report(child, status_fd)
        return
    init = os.fork()  # pid 1 of the new pid namespace
    if init == 0:
        try:
            # Killing the launcher kills init (and with it the namespace), and the program's
            # process group is not the launcher's: the program cannot signal the launcher.
            # (The death signal first: a kill of the launcher's group before setsid takes init too.)
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
            os.setsid()
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except SetupError as exc:
            _report(status_fd, {"setup_error": str(exc)})
            os._exit(0)
        child = os.fork()
        if child == 0:
            _program_child(spec, status_fd, as_root)
        _wait_report(child, status_fd)
        os._exit(0)
    os.waitpid(init, 0)


STATUS_FD = 3  # in a launcher: 0, 1, 2 are the program's streams
_running: set[int] = set()  # the fork server's launchers not yet reaped


def _reap_children(signum=None, frame=None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _running.discard(pid)


def _kill_running() -> None:
    """The evaluator is gone: no program may outlive it (a sleeping one would not hit its CPU limit)."""
    for pid in list(_running):
        try:
            os.killpg(pid, signal.SIGKILL)  # the launcher; its init follows (death signal), then the namespace
        except ProcessLookupError:
            pass


def serve(sock_fd: int, preload: list[str]) -> None:
    """The fork server's loop; returns when the evaluator closes its end of the socket."""
    for name in preload:
        importlib.import_module(name)
    gc.freeze()  # collections in the forks skip the server's objects, so do not copy their pages
    server = socket.socket(fileno=sock_fd)
    # Launchers are reaped as they end; so is what they leave when the evaluator kills a
    # launcher and its init together (orphans come here, not to the machine's init).
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    signal.signal(signal.SIGCHLD, _reap_children)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(server, 16, 4)
        except OSError:
            message = b""
        if not message:
            _kill_running()
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reaped only once it is in _running
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            for fd in fds:
                os.close(fd)
            server.send(f"error: fork: {exc.strerror}".encode())
            continue
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            server.close()
            os.setpgid(0, 0)  # a process group of its own: killed as one (the server sets it too: no race)
            for target, fd in enumerate(fds):
                os.dup2(fd, target, inheritable=target < STATUS_FD)
            os.closerange(STATUS_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            launch(STATUS_FD)
            os._exit(0)
        try:
            os.setpgid(pid, pid)
        except OSError:  # the child got there first
            pass
        _running.add(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        server.send(str(pid).encode())


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: sandbox_launcher.py serve SOCKET_FD [MODULE ...] (started by megatron_lopd.evaluation.sandbox)")
    serve(int(sys.argv[2]), sys.argv[3:])
