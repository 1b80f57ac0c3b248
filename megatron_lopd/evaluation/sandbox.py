"""A sandbox for untrusted, model-written Python programs.

`Sandbox(config).run(source, stdin, time_limit_s=...)` runs one program and returns a
`SandboxResult` (status ok / timeout / runtime_error / memory / output_limit /
sandbox_error, stdout, the tail of stderr, exit code, wall and CPU time). `start()` gives
the running program to read as it goes (the code grader stops a program at its first
failing test).

Each program is a separate process tree (`sandbox_launcher.py` describes it) in a process
group of its own, killed as a whole on timeout and always reaped. Programs are forked from a
fork server the sandbox starts once (Python started and modules imported once, not per
program); each fork then builds its own sandbox from scratch. Isolated (the default; needs
unprivileged user namespaces, which `Sandbox()` checks once and refuses without, naming
the fix):

- no network: a new network namespace whose only device, loopback, is down;
- no view of the evaluator or other processes: a new pid namespace with its own /proc; the
  program's parent is the namespace's init; the evaluator can be neither seen nor signalled;
- the filesystem read-only and nosuid; the user's home, /root, /home, /run, /var/tmp and
  /dev/shm replaced by empty directories (the Python installation stays visible where it
  lies in one); /tmp a fresh tmpfs of `workdir_mb`, the only writable place, gone when the
  program ends (its cwd and HOME are /tmp/work);
- limits (setrlimit): CPU seconds, address space, file size, open files, and processes
  (threads count). In its own user namespace the process count is per program, not per
  user; as root the program runs as uid `sandbox_uid` (65534, nobody) because the kernel
  does not hold root to RLIMIT_NPROC;
- no capabilities: it cannot undo any of this (see `_drop_privileges` in the launcher);
- an environment of its own: PATH, LANG, HOME, TMPDIR, PYTHONHASHSEED=0, nothing of the
  user's; `python -S -B -P`: the standard library only, no site-packages.

Its output is read by the evaluator up to `max_output_mb`, the program killed past that, so
it is never buffered whole. Not contained: the machine's CPU is shared (a program may use
its limits in full, `max_processes` of them at once), files the user can read outside the
hidden directories can be read (never written), and /sys is visible.
"""

from __future__ import annotations

import enum
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

from megatron_lopd.errors import ConfigError

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
ISOLATED_WORKDIR = "/tmp/work"  # the launcher's WORKDIR
DEFAULT_HIDDEN_DIRS = ("~", "/root", "/home", "/run", "/var/tmp", "/dev/shm")
ENV_MARKER = "LOPD_SANDBOX"  # in every sandboxed process's environment: the evaluator's pid
_READ_CHUNK = 1 << 16
_DRAIN_S = 2.0  # after a kill: how long to wait for the pipes to close


class SandboxStatus(enum.StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"  # wall-clock or CPU time limit
    RUNTIME_ERROR = "runtime_error"  # non-zero exit, uncaught exception, killed by a signal
    MEMORY = "memory"  # MemoryError under the address-space limit
    OUTPUT_LIMIT = "output_limit"  # more stdout than max_output_mb, or a file past it
    SANDBOX_ERROR = "sandbox_error"  # the sandbox could not be set up: not the program's doing


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of sandboxed programs (time limits are per run)."""

    memory_mb: int = 2048  # address space of each process (RLIMIT_AS)
    max_processes: int = 8  # processes and threads of one program together (RLIMIT_NPROC)
    max_open_files: int = 64
    max_output_mb: float = 64.0  # stdout read from the program, and the size of any file it writes
    workdir_mb: int = 256  # the program's private /tmp (isolated)
    stderr_tail_bytes: int = 4096
    hidden_dirs: tuple[str, ...] = DEFAULT_HIDDEN_DIRS  # "~": the evaluating user's home
    sandbox_uid: int = 65534  # the program's uid when the evaluator runs as root (isolated)
    # Where namespaces are unavailable: run programs anyway, with network access, as the
    # user, able to read and write the user's files (only cwd, HOME and limits change).
    allow_unisolated: bool = False
    python: str = sys.executable

    def validate(self) -> None:
        for name in ("memory_mb", "max_processes", "max_open_files", "max_output_mb", "workdir_mb", "stderr_tail_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox {name}={getattr(self, name)} is not positive", f"set sandbox {name} above 0")
        if self.max_processes < 2:
            raise ConfigError(f"sandbox max_processes={self.max_processes} leaves no room for the program", "allow at least 2 processes")
        if not os.access(self.python, os.X_OK):
            raise ConfigError(f"sandbox python {self.python!r} is not an executable", "point the sandbox's python at a Python >= 3.11")

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_mb * (1 << 20))


@dataclass
class SandboxResult:
    status: SandboxStatus
    stdout: bytes
    stderr: str  # the last stderr_tail_bytes
    exit_code: int | None  # negative: killed by that signal; None: not reported (killed by the sandbox)
    wall_s: float
    cpu_s: float | None
    message: str = ""  # why, for anything but ok
    isolated: bool = True

    @property
    def ok(self) -> bool:
        return self.status is SandboxStatus.OK


def _hidden_dirs(config: SandboxConfig) -> list[str]:
    """Existing directories to hide, as real paths, none inside another."""
    homes = {os.path.expanduser("~")}
    try:
        import pwd

        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    paths = set()
    for d in config.hidden_dirs:
        for path in homes if d == "~" else (d,):
            real = os.path.realpath(path)
            if os.path.isdir(real) and real != "/":
                paths.add(real)
    ordered = sorted(paths)
    return [p for p in ordered if not any(p.startswith(q.rstrip("/") + "/") for q in ordered if q != p)]


def _environment(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        ENV_MARKER: str(os.getpid()),
    }


class _ServerGone(OSError):
    """The fork server does not answer (it died, or was killed from outside)."""


class _ForkServer:
    """The process that forks every program's launcher (`sandbox_launcher.serve`)."""

    def __init__(self, python: str, preload: tuple[str, ...]):
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [python, "-S", "-B", "-P", str(LAUNCHER), "serve", str(theirs.fileno()), *preload],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=_environment("/"),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._lock = threading.Lock()

    def spawn(self, fds: list[int]) -> int:
        """Fork a launcher with `fds` as its stdin, stdout, stderr and status pipe; its pid."""
        with self._lock:
            try:
                socket.send_fds(self._socket, [b"run"], fds)
                reply = self._socket.recv(256).decode()
            except OSError as exc:
                raise _ServerGone(f"the sandbox's fork server does not answer ({exc})") from None
        if not reply:
            raise _ServerGone("the sandbox's fork server has ended")
        if not reply.isdigit():
            raise OSError(reply)  # it could not fork: the machine is out of processes or memory
        return int(reply)

    def close(self) -> None:
        self._socket.close()  # the server exits when it sees the socket closed
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class RunningProgram:
    """One sandboxed program while it runs: `read` its stdout as it comes, `kill` it,
    `finish` to wait for it, clean up and get the result. As a context manager, leaving
    the block finishes it (killing it if it still runs)."""

    def __init__(self, sandbox: "Sandbox", source: str, stdin: bytes, *, cpu_time_s: float, max_stdout_bytes: int | None):
        config = self._config = sandbox.config
        self._sandbox = sandbox  # its fork server must outlive the program
        self.isolated = sandbox.isolated
        self._cpu_limit = max(1, int(cpu_time_s + 0.999))
        self._max_stdout = config.max_output_bytes if max_stdout_bytes is None else max_stdout_bytes
        self._workdir = None if self.isolated else tempfile.mkdtemp(prefix="lopd-sandbox-")
        limits = {
            "RLIMIT_CORE": 0,
            "RLIMIT_CPU": self._cpu_limit,
            "RLIMIT_AS": config.memory_mb << 20,
            "RLIMIT_FSIZE": config.max_output_bytes,
            "RLIMIT_NOFILE": config.max_open_files,
        }
        if self.isolated:  # unisolated, RLIMIT_NPROC would count all of the user's processes
            limits["RLIMIT_NPROC"] = config.max_processes
        home = ISOLATED_WORKDIR if self.isolated else self._workdir
        spec = json.dumps({
            "source": source,
            "isolate": self.isolated,
            "limits": limits,
            "hidden_dirs": _hidden_dirs(config),
            "workdir": self._workdir,
            "workdir_kb": config.workdir_mb << 10,
            "sandbox_uid": config.sandbox_uid,
            "environment": {"HOME": home, "TMPDIR": home},
        }).encode()
        self._stdin = b"%020d" % len(spec) + spec + stdin
        self._stdin_sent = 0
        pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, status
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        self._stdin_fd, self._stdout_fd, self._stderr_fd, self._status_fd = pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]
        self.started = time.monotonic()
        try:
            self._pid = sandbox._spawn(theirs)
        except BaseException:
            for fd in (self._stdin_fd, self._stdout_fd, self._stderr_fd, self._status_fd):
                os.close(fd)
            self._remove_workdir()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self._selector = selectors.DefaultSelector()
        for fd in (self._stdout_fd, self._stderr_fd, self._status_fd):
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)
        os.set_blocking(self._stdin_fd, False)
        self._selector.register(self._stdin_fd, selectors.EVENT_WRITE)
        self._open = {self._stdin_fd, self._stdout_fd, self._stderr_fd, self._status_fd}
        self._stdout = bytearray()
        self._stdout_total = 0
        self._stderr = bytearray()
        self._status = bytearray()
        self._kill_status: SandboxStatus | None = None
        self._kill_message = ""
        self._result: SandboxResult | None = None

    # -- reading

    @property
    def stdout_closed(self) -> bool:
        return self._stdout_fd not in self._open

    @property
    def ended(self) -> bool:
        """The launcher has reported and exited (its status pipe closed)."""
        return self._status_fd not in self._open

    def read(self, deadline: float) -> bytes:
        """New stdout bytes: returns once some arrived, at `deadline` (time.monotonic()), or
        when stdout closed (b"" then, and `stdout_closed`). Bytes returned here are the
        caller's: they are not repeated in the result's stdout."""
        new = bytearray()
        self._pump(deadline, lambda: bool(new) or self.stdout_closed, new)
        return bytes(new)

    def _pump(self, deadline: float, done, stdout: bytearray) -> None:
        """Move data through the pipes until `done()` or `deadline` (past it: one look without waiting)."""
        while self._open and not done():
            events = self._selector.select(min(max(0.0, deadline - time.monotonic()), 3600.0))
            for key, _ in events:
                self._service(key.fd, stdout)
            if not events and time.monotonic() >= deadline:
                return

    def _service(self, fd: int, stdout: bytearray) -> None:
        if fd == self._stdin_fd:
            try:
                self._stdin_sent += os.write(fd, memoryview(self._stdin)[self._stdin_sent : self._stdin_sent + _READ_CHUNK])
            except (BrokenPipeError, ConnectionResetError):
                self._stdin_sent = len(self._stdin)  # the program does not read the rest
            except BlockingIOError:
                return
            if self._stdin_sent >= len(self._stdin):
                self._close(fd)
            return
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if not data:
            self._close(fd)
        elif fd == self._stdout_fd:
            self._stdout_total += len(data)
            if self._stdout_total > self._max_stdout:
                self.kill(SandboxStatus.OUTPUT_LIMIT, f"more than {self._max_stdout} bytes of output")
                self._close(fd)
                return
            stdout += data
        elif fd == self._stderr_fd:
            self._stderr += data
            del self._stderr[: -self._config.stderr_tail_bytes]
        else:
            self._status += data

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._selector.unregister(fd)
            self._open.discard(fd)
            os.close(fd)

    # -- ending

    def kill(self, status: SandboxStatus, message: str = "") -> None:
        """Kill the whole program now; its result will have `status` (the first one given)."""
        if self._kill_status is None:
            self._kill_status, self._kill_message = status, message
        self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self._pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, deadline: float | None = None) -> SandboxResult:
        """Wait until the program ends (killing it at `deadline` with status timeout), then
        clean up and return the result. Idempotent."""
        if self._result is not None:
            return self._result
        try:
            self._pump(float("inf") if deadline is None else deadline, lambda: self.ended or self._kill_status is not None, self._stdout)
            if not self.ended and self._kill_status is None:
                self.kill(SandboxStatus.TIMEOUT, "wall-clock time limit")
            wall = time.monotonic() - self.started
            if not self.isolated:
                # What the program left running in its process group. (Isolated, the kernel
                # clears the pid namespace when its init exits. Not after a clean end: the
                # group's id may then belong to a new process.)
                self._kill_group()
            drain_until = time.monotonic() + _DRAIN_S
            self._pump(drain_until, lambda: not (self._open - {self._stdin_fd}), self._stdout)
            self._result = self._classify(wall)
            return self._result
        finally:
            for fd in list(self._open):
                self._close(fd)
            self._selector.close()
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            def make_writable(func, path, _exc):  # a program may leave read-only directories
                os.chmod(os.path.dirname(path), 0o700)
                if os.path.isdir(path):
                    os.chmod(path, 0o700)
                func(path)

            shutil.rmtree(self._workdir, onerror=make_writable)
            self._workdir = None

    def _classify(self, wall: float) -> SandboxResult:
        stderr = self._stderr.decode("utf-8", "replace")
        records = [json.loads(line) for line in self._status.decode().splitlines() if line.strip()]
        setup = next((r["setup_error"] for r in records if "setup_error" in r), None)
        end = next((r for r in records if "exit_code" in r), None)
        exit_code = cpu = None
        if end is not None:
            exit_code = end["exit_code"] if end["signal"] is None else -end["signal"]
            cpu = end["cpu_s"]

        def result(status: SandboxStatus, message: str = "") -> SandboxResult:
            return SandboxResult(status, bytes(self._stdout), stderr, exit_code, wall, cpu, message, self.isolated)

        if self._kill_status is not None:
            return result(self._kill_status, self._kill_message)
        if setup is not None:
            return result(SandboxStatus.SANDBOX_ERROR, f"the sandbox could not be set up: {setup}")
        if end is None:  # the launcher was killed: by the program (possible only unisolated) or the OOM killer
            return result(SandboxStatus.RUNTIME_ERROR, "the sandbox launcher ended without a report")
        signum = end["signal"]
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu >= self._cpu_limit - 0.05):
            return result(SandboxStatus.TIMEOUT, f"CPU time limit ({self._cpu_limit} s)")
        last_line = stderr.rstrip().rsplit("\n", 1)[-1]
        # Python ignores SIGXFSZ: past the file size limit its write fails with EFBIG (27).
        if signum == signal.SIGXFSZ or (exit_code != 0 and "[Errno 27]" in last_line):
            return result(SandboxStatus.OUTPUT_LIMIT, "a file grew past the size limit")
        if exit_code == 0:
            return result(SandboxStatus.OK)
        if last_line.startswith("MemoryError"):
            return result(SandboxStatus.MEMORY, "MemoryError under the memory limit")
        how = f"killed by signal {signal.Signals(signum).name}" if signum else f"exit code {exit_code}"
        return result(SandboxStatus.RUNTIME_ERROR, f"{how}: {last_line[:200]}" if last_line else how)

    def __enter__(self) -> "RunningProgram":
        return self

    def __exit__(self, *exc) -> None:
        if self._result is None:
            self._pump(time.monotonic(), lambda: self.ended, self._stdout)
            if not self.ended:  # (after a clean end there is nothing left to kill)
                self.kill(self._kill_status or SandboxStatus.SANDBOX_ERROR, self._kill_message or "abandoned by the caller")
            self.finish()


_isolation_checked: dict[tuple, str | None] = {}
_isolation_lock = threading.Lock()
_warned_unisolated = False


class Sandbox:
    """Runs programs under `config`, from a fork server that has imported `preload`.
    Construction checks once per process (and Python, hidden directories) that isolation
    works here, and refuses otherwise unless `config.allow_unisolated`. Thread-safe;
    `close()` (or garbage collection) stops the fork server."""

    def __init__(self, config: SandboxConfig = SandboxConfig(), *, preload: tuple[str, ...] = ()):
        config.validate()
        self.config = config
        self.preload = preload
        self.isolated = True
        self._server: list[_ForkServer | None] = [None]  # shared with the finalizer, which must not hold self
        self._server_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, Sandbox._close_server, self._server)
        problem = self._isolation_problem()
        if problem is None:
            return
        if not config.allow_unisolated:
            self.close()
            raise ConfigError(
                f"the code sandbox cannot isolate programs on this machine ({problem})",
                "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0) "
                "or accept running model-written programs with network access and your file permissions: --sandbox-allow-unisolated "
                "(SandboxConfig(allow_unisolated=True))",
            )
        self.isolated = False
        global _warned_unisolated
        if not _warned_unisolated:
            _warned_unisolated = True
            warnings.warn(f"code sandbox: running programs UNISOLATED (network, your files): {problem}", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _close_server(holder: list) -> None:
        if holder[0] is not None:
            holder[0].close()
            holder[0] = None

    def close(self) -> None:
        self._finalizer()

    @property
    def fork_server_pid(self) -> int | None:
        """The fork server's pid (it carries ENV_MARKER too, and is every launcher's parent); None before the first run."""
        server = self._server[0]
        return server._process.pid if server is not None else None

    def _spawn(self, fds: list[int]) -> int:
        holder = self._server
        with self._server_lock:
            if not self._finalizer.alive:
                raise RuntimeError("this Sandbox is closed")
            if holder[0] is None:
                holder[0] = _ForkServer(self.config.python, self.preload)
            server = holder[0]
        try:
            return server.spawn(fds)
        except _ServerGone:  # killed from outside? One new one (what it ran died with it)
            with self._server_lock:
                if holder[0] is server:
                    server.close()
                    holder[0] = _ForkServer(self.config.python, self.preload)
                server = holder[0]
            return server.spawn(fds)

    def _isolation_problem(self) -> str | None:
        key = (self.config.python, tuple(_hidden_dirs(self.config)), self.config.sandbox_uid, os.getuid())
        with _isolation_lock:
            if key not in _isolation_checked:
                try:
                    probe = self.run("print('ok')", time_limit_s=30.0)
                except OSError as exc:
                    raise ConfigError(
                        f"the code sandbox could not start a program ({exc})", f"check that {self.config.python} runs and that the machine can fork"
                    ) from None
                if probe.status is SandboxStatus.SANDBOX_ERROR:
                    _isolation_checked[key] = probe.message.removeprefix("the sandbox could not be set up: ")
                elif not probe.ok or probe.stdout != b"ok\n":
                    _isolation_checked[key] = f"a trivial program failed: {probe.status}: {probe.message or probe.stderr[-200:]}"
                else:
                    _isolation_checked[key] = None
            return _isolation_checked[key]

    def start(self, source: str, stdin: bytes | str = b"", *, cpu_time_s: float, max_stdout_bytes: int | None = None) -> RunningProgram:
        """Start `source` (Python) with `stdin`; CPU time is limited to `cpu_time_s` per process,
        wall-clock time is the caller's to enforce (`finish(deadline)`, `kill`)."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return RunningProgram(self, source, data, cpu_time_s=cpu_time_s, max_stdout_bytes=max_stdout_bytes)

    def run(self, source: str, stdin: bytes | str = b"", *, time_limit_s: float = 10.0) -> SandboxResult:
        """Run `source` to its end, or for at most `time_limit_s` (wall clock, and CPU)."""
        with self.start(source, stdin, cpu_time_s=time_limit_s) as program:
            return program.finish(program.started + time_limit_s)
