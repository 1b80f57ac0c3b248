"""Runs one candidate program against a problem's test inputs, inside the sandbox.

`megatron_lopd.evaluation.code` sends this file's text as the sandboxed program and the
job as its stdin (JSON): `{"program": str, "fn_name": str | null, "inputs": [...],
"max_output_bytes": int}`. Standard library only. All tests run in this one process, in
order, each in a fresh namespace; expected outputs never enter the sandbox: the grader
compares, and stops the process at the first failure.

- stdin problems (`fn_name` null): each input is the program's stdin (a real file on fd 0:
  `input()`, `sys.stdin`, `open(0)` all work); its stdout (fd 1, also a real file) is the
  test's output. The program runs as `__main__`, once per test.
- functional problems: the program is loaded once (not as `__main__`); with a `class
  Solution` the method `fn_name` of one `Solution()` is called, else the function
  `fn_name`, with each input's arguments; the output is the JSON of the return value.

As in LiveCodeBench, the program's namespace starts with the standard modules its
grader pre-imports (`from math import *`, `import sys`, ...; see IMPLICIT_STAR_IMPORTS) and
`SystemExit` ends a test normally. `random` is seeded with 0 before each test, so runs
repeat.

Report frames go to the original stdout (kept on a private descriptor):
`b"<meta length> <data length>\\n" + meta (JSON) + data`; meta is `{"event": "ready"}` once
the program is loaded (with `"status"` and `"error"` if it could not be), then
`{"event": "test", "index": i, "status": ..., "error": ...}` per test with the output as
data; status is ok, runtime_error, memory or output_limit.
"""

from __future__ import annotations

import builtins
import fcntl
import gc
import importlib
import json
import os
import random
import signal
import sys
import threading
import types

# What LiveCodeBench's grader star-imports into every program, in its order (later names
# win), and the modules it also binds by name (all of them but builtins and typing).
IMPLICIT_STAR_IMPORTS = (
    "string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random", "statistics",
    "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing",
)
IMPLICIT_MODULES = IMPLICIT_STAR_IMPORTS[:-2]
RECURSION_LIMIT = 50_000  # LiveCodeBench's grader sets the same
ERROR_CHARS = 300

_write, _dup2, _fstat, _pread = os.write, os.dup2, os.fstat, os.pread  # the program may patch os


def implicit_namespace() -> dict:
    namespace: dict = {}
    for name in IMPLICIT_STAR_IMPORTS:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        if public is None:
            public = [n for n in vars(module) if not n.startswith("_")]
        namespace.update({n: getattr(module, n) for n in public if hasattr(module, n)})
    namespace.update({name: sys.modules[name] for name in IMPLICIT_MODULES})
    return namespace


class Reporter:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, meta: dict, data: bytes = b"") -> None:
        encoded = json.dumps(meta).encode()
        view = memoryview(b"%d %d\n" % (len(encoded), len(data)) + encoded + data)
        while view:
            view = view[_write(self.fd, view) :]


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_CHARS]


def failure_status(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: past the sandbox's file size limit
        return "output_limit"
    return "runtime_error"


def memory_file(name: str) -> int:
    """An anonymous in-memory file, on a descriptor above 2 (the program may have closed 0-2)."""
    fd = os.memfd_create(name)
    if fd > 2:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return high


def fresh_module(base: dict, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(base)
    module.__dict__.update(__name__=name, __builtins__=builtins, __file__="program.py")
    module.__dict__.update(stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)  # `from sys import *` names
    return module


class Streams:
    """Per test: a fresh in-memory file as fd 0 holding the input, another as fd 1 taking
    the output, and new `sys.stdin` / `sys.stdout` objects on them."""

    def __init__(self, text: str, max_output_bytes: int):
        self.max_output_bytes = max_output_bytes
        stdin_fd = memory_file("stdin")
        data = text.encode()
        while data:
            data = data[_write(stdin_fd, data) :]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        _dup2(stdin_fd, 0)
        os.close(stdin_fd)
        self.stdout_fd = memory_file("stdout")
        _dup2(self.stdout_fd, 1)
        sys.stdin = open(0, "r", encoding="utf-8", closefd=False)
        sys.stdout = self.stdout = open(1, "w", encoding="utf-8", closefd=False)

    def collect(self) -> tuple[bytes, bool]:
        """The output so far, and whether it reached the size limit."""
        for stream in {id(s): s for s in (sys.stdout, self.stdout)}.values():
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        size = _fstat(self.stdout_fd).st_size
        data = _pread(self.stdout_fd, min(size, self.max_output_bytes), 0)
        os.close(self.stdout_fd)
        return data, size >= self.max_output_bytes


def end_of_program(module: types.ModuleType) -> None:
    """What an interpreter exit would do: wait for the program's threads, and free its
    objects (file objects it opened on fd 1 flush when freed)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    module.__dict__.clear()
    gc.collect()


def run_stdin_tests(reporter: Reporter, job: dict, base: dict) -> None:
    try:
        code = compile(job["program"], "program.py", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: a null byte in the source
        reporter.send({"event": "ready", "status": "runtime_error", "error": error_text(exc)})
        return
    reporter.send({"event": "ready"})
    for index, text in enumerate(job["inputs"]):
        streams = Streams(text, job["max_output_bytes"])
        module = fresh_module(base, "__main__")
        sys.modules["__main__"] = module
        random.seed(0)
        status, error = "ok", ""
        try:
            exec(code, module.__dict__)
        except SystemExit:
            pass
        except BaseException as exc:
            status, error = failure_status(exc), error_text(exc)
        end_of_program(module)
        output, full = streams.collect()
        if full:
            status, error = "output_limit", f"{job['max_output_bytes']} bytes of output"
        reporter.send({"event": "test", "index": index, "status": status, "error": error}, output)
        if status != "ok":
            return


def run_functional_tests(reporter: Reporter, job: dict, base: dict) -> None:
    fn_name, program = job["fn_name"], job["program"]
    sink = Streams("", job["max_output_bytes"])  # what the program prints is not its answer
    module = fresh_module(base, "solution")
    sys.modules["solution"] = module
    random.seed(0)
    try:
        exec(compile(program, "program.py", "exec"), module.__dict__)
        if "class Solution" in program:  # LeetCode style, as LiveCodeBench decides it
            target = module.__dict__["Solution"]()
            method = getattr(target, fn_name)
        else:
            method = module.__dict__[fn_name]
    except BaseException as exc:
        if isinstance(exc, KeyError):
            exc = NameError(f"the program defines no {fn_name!r}")
        reporter.send({"event": "ready", "status": failure_status(exc), "error": error_text(exc)})
        return
    sink.collect()
    reporter.send({"event": "ready"})
    for index, args in enumerate(job["inputs"]):
        sink = Streams("", job["max_output_bytes"])
        random.seed(0)
        meta = {"event": "test", "index": index, "status": "ok", "error": ""}
        data = b""
        try:
            value = method(*args)
        except BaseException as exc:
            meta.update(status=failure_status(exc), error=error_text(exc))
        else:
            try:
                data = json.dumps(value).encode()
            except (TypeError, ValueError) as exc:  # not JSON: cannot equal the expected value
                meta["json_error"] = error_text(exc)
                data = repr(value)[: job["max_output_bytes"]].encode("utf-8", "replace")
        sink.collect()
        reporter.send(meta, data)
        if meta["status"] != "ok":
            return


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    reporter = Reporter(os.dup(1))  # fd 1 becomes each test's output file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the file size limit: EFBIG, not death
    sys.setrecursionlimit(RECURSION_LIMIT)
    base = implicit_namespace()
    if job["fn_name"] is None:
        run_stdin_tests(reporter, job, base)
    else:
        run_functional_tests(reporter, job, base)
    # No interpreter exit: a thread the program left could keep the process alive.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
