"""The sandbox against hostile programs: each is contained, reported with the reason, and
leaves nothing behind on the host (no process, no zombie, no file outside its directory).

Isolation needs unprivileged user namespaces; where this machine has none the isolated
tests skip, and the refusal / opt-in tests run the real thing (in a user namespace whose
namespace quota is 0 when the machine has them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import megatron_lopd
from megatron_lopd.errors import ConfigError
from megatron_lopd.evaluation.sandbox import ENV_MARKER, Sandbox, SandboxConfig, SandboxStatus

REPO = Path(megatron_lopd.__file__).resolve().parents[1]
CAP = 1 << 20  # max_output_mb=1
CONFIG = SandboxConfig(memory_mb=512, max_processes=6, max_output_mb=1, workdir_mb=16)


@pytest.fixture(scope="module")
def sandbox():
    try:
        box = Sandbox(CONFIG)
    except ConfigError as exc:
        pytest.skip(f"this machine cannot isolate programs: {exc}")
    yield box
    box.close()


def _processes_with_marker(exclude: set[int]) -> list[tuple[int, str]]:
    """Live processes (zombies included) that carry this test process's sandbox marker."""
    marker = f"{ENV_MARKER}={os.getpid()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append((int(entry.name), (entry / "stat").read_text().split(")")[-1].split()[0]))
        except OSError:
            continue
    return found


def _children_of(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append((int(entry.name), fields[0]))
    return out


def _assert_nothing_left(box: Sandbox) -> None:
    deadline = time.monotonic() + 5
    while True:
        left = _processes_with_marker({box.fork_server_pid})
        children = _children_of(box.fork_server_pid)
        if not left and not children:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {left}, fork server children (Z = zombie) {children}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# Ordinary programs


def test_runs_a_program_with_stdin(sandbox):
    result = sandbox.run("import sys\nprint(sys.stdin.read()[::-1], end='')", "olleh")
    assert result.status is SandboxStatus.OK and result.ok
    assert result.stdout == b"hello" and result.exit_code == 0 and result.isolated
    assert 0 < result.wall_s < 10 and result.cpu_s is not None and result.cpu_s < 5


def test_input_larger_than_a_pipe_and_stdin_idioms(sandbox):
    data = "7\n" * 1_500_000  # 3 MB
    source = "import sys\nfirst = input()\nrest = sys.stdin.read()\nprint(first, len(rest.split()))"
    result = sandbox.run(source, data)
    assert result.ok and result.stdout == b"7 1499999\n"


@pytest.mark.parametrize(
    "source,status,exit_code,message",
    [
        ("import sys; sys.exit(0)", SandboxStatus.OK, 0, ""),
        ("import sys; sys.exit(3)", SandboxStatus.RUNTIME_ERROR, 3, "exit code 3"),
        ("raise ValueError('boom')", SandboxStatus.RUNTIME_ERROR, 1, "ValueError: boom"),
        ("print(", SandboxStatus.RUNTIME_ERROR, 1, "SyntaxError"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", SandboxStatus.RUNTIME_ERROR, -signal.SIGSEGV, "SIGSEGV"),
    ],
)
def test_exit_statuses(sandbox, source, status, exit_code, message):
    result = sandbox.run(source)
    assert (result.status, result.exit_code) == (status, exit_code), result
    assert message in result.message


def test_tracebacks_show_the_program_only(sandbox):
    result = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert "ZeroDivisionError" in result.stderr and 'File "program.py", line 2' in result.stderr
    assert "sandbox_launcher" not in result.stderr


def test_environment_is_minimal_and_working_dir_fresh(sandbox, monkeypatch):
    monkeypatch.setenv("LOPD_TEST_SECRET", "s3cret")
    source = "import json, os\nopen('note', 'w').write('x')\nprint(json.dumps([os.getcwd(), os.environ['HOME'], dict(os.environ), sorted(os.listdir('.'))]))"
    first = json.loads(sandbox.run(source).stdout)
    second = json.loads(sandbox.run(source).stdout)
    cwd, home, env, listing = first
    assert cwd == home == "/tmp/work" and listing == ["note"]
    assert second[3] == ["note"]  # the first run's file is gone: a fresh directory each time
    assert set(env) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", ENV_MARKER}
    assert "s3cret" not in json.dumps(env) and env["PYTHONHASHSEED"] == "0"


def test_standard_library_only(sandbox):
    result = sandbox.run("import collections, heapq, math, fractions, decimal\nimport numpy")
    assert result.status is SandboxStatus.RUNTIME_ERROR and "ModuleNotFoundError" in result.message


# ---------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_times_out(sandbox):
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass", time_limit_s=1)
    assert result.status is SandboxStatus.TIMEOUT and time.monotonic() - start < 5


def test_cpu_limit_holds_without_a_wall_clock_deadline(sandbox):
    with sandbox.start("while True:\n    pass", cpu_time_s=1) as program:
        result = program.finish(program.started + 30)
    assert result.status is SandboxStatus.TIMEOUT and "CPU time limit" in result.message and result.wall_s < 10


def test_memory_balloon(sandbox):
    result = sandbox.run("x = bytearray(4 << 30)")
    assert result.status is SandboxStatus.MEMORY, result


def test_a_gigabyte_of_output_is_cut_off(sandbox):
    source = "import os\nblock = b'x' * (1 << 20)\nfor _ in range(1024):\n    os.write(1, block)"
    result = sandbox.run(source, time_limit_s=20)
    assert result.status is SandboxStatus.OUTPUT_LIMIT and len(result.stdout) <= CAP


def test_file_size_is_limited(sandbox):
    result = sandbox.run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert result.status is SandboxStatus.OUTPUT_LIMIT and "File too large" in result.stderr


def test_process_count_is_limited_per_program(sandbox):
    source = textwrap.dedent("""
        import os, time
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(2)
                    os._exit(0)
            except OSError as exc:
                print(children, exc.errno)
                break
            children += 1
    """)
    result = sandbox.run(source, time_limit_s=10)
    assert result.stdout == b"%d 11\n" % (CONFIG.max_processes - 1), result  # EAGAIN once the program has max_processes


def test_fork_bomb_is_contained(sandbox):
    source = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = sandbox.run(source, time_limit_s=1)
    assert result.status is SandboxStatus.TIMEOUT and time.monotonic() - start < 10
    assert sandbox.run("print('next')").stdout == b"next\n"  # and the next program runs
    _assert_nothing_left(sandbox)


def test_daemons_die_with_the_program(sandbox):
    source = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    assert sandbox.run(source).stdout == b"parent done\n"
    _assert_nothing_left(sandbox)


def test_no_network(sandbox):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    source = textwrap.dedent(f"""
        import socket
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection(address, timeout=3)
                print("connected", address)
            except OSError as exc:
                print("refused", exc.errno)
    """)
    result = sandbox.run(source)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing reached the evaluator's server
        server.accept()
    server.close()
    assert result.ok and result.stdout.decode().split("\n")[:2] == ["refused 101", "refused 101"], result  # ENETUNREACH


def test_cannot_write_outside_its_directory(sandbox, tmp_path):
    targets = [tmp_path / "escape", REPO / "escape-from-sandbox", Path("/var/tmp/escape-from-sandbox"), Path("/etc/escape-from-sandbox"),
               Path(os.path.expanduser("~")) / "escape-from-sandbox", Path("/tmp/escape-from-sandbox")]
    source = textwrap.dedent(f"""
        import os
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as exc:
                print("denied", exc.errno)
        open("inside", "w").write("x")
        print("inside", os.path.getsize("inside"))
    """)
    result = sandbox.run(source)
    lines = result.stdout.decode().split("\n")
    assert result.ok and lines[-2] == "inside 1"
    # /tmp is the program's own tmpfs: writing there works and vanishes with it.
    assert lines[5] == "wrote /tmp/escape-from-sandbox" and all(line.startswith("denied") for line in lines[:5]), lines
    assert not any(t.exists() for t in targets)


def test_cannot_read_homes(sandbox, tmp_path, monkeypatch):
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    (fake_home / "secret.txt").write_text("s3cret")
    real_home = Path(os.path.expanduser("~"))
    monkeypatch.setenv("HOME", str(fake_home))
    real_entries = sorted(p.name for p in real_home.iterdir()) if real_home.is_dir() else []
    source = textwrap.dedent(f"""
        import os
        try:
            print(open({str(fake_home / "secret.txt")!r}).read())
        except OSError as exc:
            print("denied", exc.errno)
        print(sorted(os.listdir({str(real_home)!r})) if os.path.isdir({str(real_home)!r}) else [])
    """)
    result = sandbox.run(source)
    first, listing = result.stdout.decode().split("\n")[:2]
    assert result.ok and first == "denied 2" and "s3cret" not in result.stdout.decode()
    python_home = Path(sys.base_prefix).resolve()
    visible = eval(listing)  # only what leads to the Python installation, if it lies in the home
    expected = [python_home.relative_to(real_home.resolve()).parts[0]] if python_home.is_relative_to(real_home.resolve()) else []
    assert visible == expected and (not real_entries or set(real_entries) - set(visible))


def test_cannot_see_or_kill_the_evaluator(sandbox):
    me = os.getpid()
    source = textwrap.dedent(f"""
        import os, signal
        print(os.getppid(), sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), flush=True)
        for pid in ({me}, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
                print("sent", pid, flush=True)
            except OSError as exc:
                print("denied", exc.errno, flush=True)
        os.killpg(0, signal.SIGKILL)
    """)
    result = sandbox.run(source)
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "1 [1, 2]"  # its parent is the namespace's init; no other process is visible
    assert lines[1] == "denied 3"  # ESRCH: the evaluator's pid does not exist in there
    assert lines[2] in ("denied 1", "sent 1")  # init: another uid (EPERM), or a namespace init, which ignores it
    # Its own process group's SIGKILL killed only itself: init lived on to report that.
    assert result.status is SandboxStatus.RUNTIME_ERROR and result.exit_code == -signal.SIGKILL
    assert sandbox.run("print('still here')").stdout == b"still here\n"


def test_cannot_undo_the_sandbox(sandbox):
    source = textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        # unmount the tmpfs that hides a home; remount / writable
        print(libc.umount2(b"/root", 2), libc.umount2(b"/home", 2), libc.mount(None, b"/", None, 32 | 4096, None))
        print([line for line in open("/proc/self/status") if line.startswith("NoNewPrivs")])
    """)
    result = sandbox.run(source)
    assert result.stdout.decode().split("\n")[:2] == ["-1 -1 -1", "['NoNewPrivs:\\t1\\n']"], result


def test_a_killed_fork_server_is_replaced(sandbox):
    assert sandbox.run("pass").ok
    old = sandbox.fork_server_pid
    os.kill(old, signal.SIGKILL)
    result = sandbox.run("print('again')")
    assert result.stdout == b"again\n" and sandbox.fork_server_pid not in (None, old)
    assert not Path(f"/proc/{old}").exists()  # and the dead one was reaped


def test_nothing_outlives_a_killed_evaluator(sandbox):
    """The evaluator dies (SIGKILL) while a program sleeps, which no CPU limit would end."""
    evaluator = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from megatron_lopd.evaluation.sandbox import Sandbox, SandboxConfig
            box = Sandbox(SandboxConfig(max_output_mb=1))
            program = box.start("import time\\nprint('asleep', flush=True)\\ntime.sleep(600)", cpu_time_s=600)
            print(program.read(program.started + 60).decode(), end="", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert evaluator.stdout.readline() == b"asleep\n"
        marker = f"{ENV_MARKER}={evaluator.pid}".encode()
        assert _marked(marker)  # the fork server, the launcher, init and the program
        evaluator.kill()
        evaluator.wait()
        deadline = time.monotonic() + 10
        while _marked(marker):
            assert time.monotonic() < deadline, f"left behind: {_marked(marker)}"
            time.sleep(0.1)
    finally:
        evaluator.kill()
        evaluator.wait()


def _marked(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------------------
# Configuration, refusal and the opt-in


@pytest.mark.parametrize("field,value,message", [("memory_mb", 0, "memory_mb"), ("max_processes", 1, "max_processes"), ("python", "/nonexistent/python", "not an executable")])
def test_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Sandbox(SandboxConfig(**{field: value}))


_WITHOUT_NAMESPACES = textwrap.dedent("""
    import json, os, sys, warnings
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.evaluation.sandbox import Sandbox, SandboxConfig
    try:
        Sandbox()
        print("ISOLATED")
    except ConfigError as exc:
        print("REFUSED", str(exc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        box = Sandbox(SandboxConfig(allow_unisolated=True, max_output_mb=1))
    print("WARNED", any("UNISOLATED" in str(w.message) for w in caught))
    result = box.run("import os; print(os.getcwd())")
    workdir = result.stdout.decode().strip()
    import tempfile
    inside_temp = workdir.startswith(os.path.join(tempfile.gettempdir(), "lopd-sandbox-"))
    print("RESULT", json.dumps([result.status, result.isolated, inside_temp, os.path.exists(workdir)]))
    print("TIMEOUT", box.run("while True:\\n    pass", time_limit_s=1).status)
""")


def test_refuses_without_namespaces_unless_allowed():
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-r", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a user namespace here to take namespaces away")
    # In a user namespace of our own whose quota of nested user namespaces is 0.
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c {_quote(_WITHOUT_NAMESPACES)}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([unshare, "-r", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "REFUSED" in lines, out
    assert "cannot isolate programs" in lines["REFUSED"] and "--sandbox-allow-unisolated" in lines["REFUSED"] and "\n" not in lines["REFUSED"]
    assert lines["WARNED"] == "True"
    assert json.loads(lines["RESULT"]) == ["ok", False, True, False]  # ran, unisolated, in a temp dir since removed
    assert lines["TIMEOUT"] == "timeout"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


_AS_NOBODY = textwrap.dedent("""
    import ctypes, json
    from megatron_lopd.evaluation.sandbox import Sandbox, SandboxConfig
    box = Sandbox(SandboxConfig(max_processes=5))
    fork = "import os, time\\nn = 0\\nwhile True:\\n    try:\\n        if os.fork() == 0:\\n            time.sleep(2)\\n            os._exit(0)\\n    except OSError:\\n        break\\n    n += 1\\nprint(n)"
    undo = "import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\nprint(libc.umount2(b'/home', 2), libc.mount(None, b'/', None, 33, None))"
    print(json.dumps([box.isolated, box.run(fork).stdout.decode(), box.run(undo).stdout.decode()]))
""")


def test_isolation_for_an_unprivileged_evaluator(tmp_path):
    """What a cluster user gets (the rest of this file runs as whoever runs the tests)."""
    if os.getuid() != 0:
        pytest.skip("the other tests already run as an unprivileged user")
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv")
    # nobody must reach Python and this checkout (which may lie under a private directory, e.g. a CI clone
    # in a mktemp dir): bind both to world-readable places, in a mount namespace of the test's own.
    mount_point, repo_point = (Path(tempfile.mkdtemp(prefix=f"lopd-{what}-", dir="/tmp")) for what in ("python", "repo"))
    try:
        for point in (mount_point, repo_point):
            point.chmod(0o755)
        python = mount_point / Path(sys.executable).resolve().relative_to(Path(sys.base_prefix).resolve())
        script = (
            f"mount --bind {sys.base_prefix} {mount_point} && mount --bind {REPO} {repo_point} && cd / && "
            f"exec setpriv --reuid=65534 --regid=65534 --clear-groups env -i PYTHONPATH={repo_point} {python} -c {_quote(_AS_NOBODY)}"
        )
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    finally:
        mount_point.rmdir()
        repo_point.rmdir()
    assert out.returncode == 0, out
    isolated, forks, undo = json.loads(out.stdout.strip().splitlines()[-1])
    assert isolated and forks == "4\n" and undo == "-1 -1\n"
