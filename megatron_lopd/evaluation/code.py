"""Code problems (LiveCodeBench style): their tests, the program in a response, running it.

The reference answer of a code problem is JSON, in one form:

    {"tests": [{"input": "...", "output": "..."}, ...],   # at least one
     "fn_name": null,                                     # or the function / method name
     "time_limit_s": null}                                # per test; null: the grader's (6 s)

- `fn_name` null (stdin problems): `input` is the program's stdin, `output` the expected
  stdout. Outputs are compared as LiveCodeBench does: both are stripped, split into lines,
  each line stripped (so trailing and leading blanks, CRLF and trailing empty lines do not
  matter); the line counts must agree; a line that differs as text still matches if both
  are whitespace-separated numbers with equal exact decimal values (`1.50` = `1.5` =
  `15e-1`, but `0.333333` != `0.3333333`: there is no tolerance).
- `fn_name` set (functional, LeetCode-style): `input` holds the arguments as JSON values,
  one per line; `output` the JSON of the expected return value. With a `class Solution` in
  the program its method `fn_name` is called, else the function; the return value must
  equal the expected one after a JSON round trip (tuples are lists; 1 == 1.0).

LiveCodeBench rows are converted to this form when they are read
(`megatron_lopd/datasets/livecodebench.py`, `--format lcb`).

A response's program is its last fenced code block tagged python / py / python3 or not
tagged; a sample passes when every test passes. All tests of one program run in one
sandboxed process (`code_harness.py`), stopped at the first failing test; the outcome's
`detail` says which and why: `passed`, `no_code`, or `<kind>: test <i>/<n>[: <why>]` with
kind wrong_answer, timeout, runtime_error, memory or output_limit (`loading the program`
instead of a test when it failed before the first one, e.g. a SyntaxError).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.evaluation import code_harness
from megatron_lopd.evaluation.sandbox import Sandbox, SandboxStatus

DEFAULT_TIME_LIMIT_S = 6.0  # per test, LiveCodeBench's
STARTUP_ALLOWANCE_S = 10.0  # Python and the namespaces starting, on a loaded machine
PYTHON_TAGS = ("python", "py", "python3", "")
OUTCOMES = ("passed", "wrong_answer", "timeout", "runtime_error", "memory", "output_limit", "no_code")
TESTS_FORMAT = '{"tests": [{"input": "...", "output": "..."}], "fn_name": null, "time_limit_s": null}'
# What the sandbox's fork server imports once, so that no program pays for it.
HARNESS_PRELOAD = (*code_harness.IMPLICIT_STAR_IMPORTS, "fcntl", "gc", "importlib", "types")
_TESTS_FIX = f"store a code problem's answer as JSON: {TESTS_FORMAT} (see megatron_lopd/evaluation/code.py)"
_CLIP = 60


@dataclass(frozen=True)
class CodeTests:
    """A code problem's tests, parsed: stdin texts and expected stdout texts, or (with
    `fn_name`) argument lists and expected return values."""

    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]
    fn_name: str | None = None
    time_limit_s: float | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def _bad(what: str, fix: str = _TESTS_FIX) -> ArtifactError:
    return ArtifactError(f"code tests: {what}", fix)


def parse_code_tests(answer: str) -> CodeTests:
    """The tests in a code problem's answer (the JSON form above); ArtifactError if it is not that."""
    try:
        obj = json.loads(answer)
    except (json.JSONDecodeError, TypeError) as exc:
        raise _bad(f"the answer is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad(f"the answer is a JSON {type(obj).__name__}, not an object")
    unknown = set(obj) - {"tests", "fn_name", "time_limit_s"}
    if unknown:
        raise _bad(f"unknown key(s) {sorted(unknown)} in the answer")
    tests, fn_name, limit = obj.get("tests"), obj.get("fn_name"), obj.get("time_limit_s")
    if not isinstance(tests, list) or not tests:
        raise _bad("the problem has no tests ('tests' is missing or empty)", "give every code problem at least one test, or drop it")
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise _bad(f"fn_name {fn_name!r} is not a Python identifier")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise _bad(f"time_limit_s {limit!r} is not a positive number")
    inputs, outputs = [], []
    for i, test in enumerate(tests, start=1):
        if not isinstance(test, dict) or not isinstance(test.get("input"), str) or not isinstance(test.get("output"), str):
            raise _bad(f"test {i} is not an object with string 'input' and 'output'")
        if fn_name is None:
            inputs.append(test["input"])
            outputs.append(test["output"])
            continue
        try:
            inputs.append([json.loads(line) for line in test["input"].split("\n") if line.strip()])
        except json.JSONDecodeError as exc:
            raise _bad(f"test {i}: an argument line of a functional test is not JSON ({exc})", "write one JSON value per line in 'input'") from None
        try:
            outputs.append(json.loads(test["output"]))
        except json.JSONDecodeError as exc:
            raise _bad(f"test {i}: the expected output of a functional test is not JSON ({exc})", "write the expected return value as JSON") from None
    return CodeTests(tuple(inputs), tuple(outputs), fn_name, float(limit) if limit is not None else None)


# ---------------------------------------------------------------------------------------
# The program in a response

_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,})[ \t]*([^\s`]*)[^`]*$")


def extract_program(response: str) -> str | None:
    """The last complete fenced code block tagged python / py / python3 or untagged (blocks
    in other languages are skipped); None if there is none or it is empty."""
    blocks: list[tuple[str, str]] = []
    fence = tag = None
    body: list[str] = []
    for line in response.split("\n"):
        if fence is None:
            match = _FENCE_OPEN.match(line)
            if match:
                fence, tag, body = match.group(1), match.group(2).lower(), []
        elif line.strip().startswith(fence) and not line.strip().strip("`"):
            blocks.append((tag, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    programs = [code for tag, code in blocks if tag in PYTHON_TAGS and code.strip()]
    return programs[-1] if programs else None


# ---------------------------------------------------------------------------------------
# Comparing outputs


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except InvalidOperation:
        return None


def _clip(text: str) -> str:
    return repr(text if len(text) <= _CLIP else text[: _CLIP - 3] + "...")


def stdout_mismatch(actual: str, expected: str) -> str | None:
    """Why `actual` stdout is not the `expected` one (LiveCodeBench's rule); None if it is."""
    got, want = _lines(actual), _lines(expected)
    if len(got) != len(want):
        return f"{len(got)} output lines, expected {len(want)}"
    for number, (g, w) in enumerate(zip(got, want), start=1):
        if g == w:
            continue
        gd, wd = _decimals(g), _decimals(w)
        try:
            if gd is not None and wd is not None and gd == wd:
                continue
        except InvalidOperation:  # a signalling NaN
            pass
        return f"line {number}: got {_clip(g)}, expected {_clip(w)}"
    return None


def _value_mismatch(data: bytes, meta: dict, expected: Any) -> str | None:
    if "json_error" in meta:
        return f"returned a value that is not JSON ({meta['json_error']})"
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "the harness reported an unreadable return value"
    if value == expected:
        return None
    return f"returned {_clip(json.dumps(value))}, expected {_clip(json.dumps(expected))}"


# ---------------------------------------------------------------------------------------
# Running a program's tests


@dataclass(frozen=True)
class CodeOutcome:
    kind: str  # one of OUTCOMES
    test: int | None = None  # the failing test (0-based); None: none, or before the first test
    total: int = 0
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.kind == "passed"

    @property
    def detail(self) -> str:
        if self.kind in ("passed", "no_code"):
            return self.kind
        where = "loading the program" if self.test is None else f"test {self.test + 1}/{self.total}"
        return f"{self.kind}: {where}" + (f": {self.message}" if self.message else "")


@cache
def harness_source() -> str:
    return Path(__file__).with_name("code_harness.py").read_text()


class _Frames:
    """The harness's report frames, from its stdout as it arrives. Bytes that are not a frame
    (the program wrote into the channel) set `garbled` to why; the frames before them are kept,
    so the test they belong to is known."""

    def __init__(self, max_frame_bytes: int):
        self.buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self.garbled: str | None = None

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self.buffer += data
        frames: list[tuple[dict, bytes]] = []
        while self.garbled is None:
            newline = self.buffer.find(b"\n", 0, 48)
            if newline < 0:
                if len(self.buffer) >= 48:
                    self.garbled = "a report frame without a header"
                break
            try:
                meta_len, data_len = map(int, self.buffer[:newline].split())
            except ValueError:
                self.garbled = "a report frame with a bad header"
                break
            if not (0 <= meta_len and 0 <= data_len and meta_len + data_len <= self.max_frame_bytes):
                self.garbled = f"a report frame of {meta_len} + {data_len} bytes"
                break
            end = newline + 1 + meta_len + data_len
            if len(self.buffer) < end:
                break
            try:
                meta = json.loads(self.buffer[newline + 1 : newline + 1 + meta_len])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                self.garbled = "a report frame that is not a JSON object"
                break
            frames.append((meta, bytes(self.buffer[newline + 1 + meta_len : end])))
            del self.buffer[:end]
        return frames


class _SandboxBroken(Exception):
    pass


_CRASH_KINDS = {
    SandboxStatus.TIMEOUT: "timeout",
    SandboxStatus.MEMORY: "memory",
    SandboxStatus.OUTPUT_LIMIT: "output_limit",
}


def run_tests(sandbox: Sandbox, program: str, tests: CodeTests, *, time_limit_s: float, startup_s: float = STARTUP_ALLOWANCE_S) -> CodeOutcome:
    """Run `program` on `tests` in one sandboxed process, stopping at the first failure.
    Each test may take `time_limit_s` of wall-clock time (loading the program too, after
    `startup_s` for the interpreter to start). A sandbox that fails to start is retried
    once; then ConfigError (a broken sandbox must not pass for wrong programs)."""
    for attempt in range(2):
        try:
            return _run_once(sandbox, program, tests, time_limit_s, startup_s)
        except _SandboxBroken as exc:
            if attempt:
                raise ConfigError(f"the code sandbox failed twice in a row: {exc}", "check the machine (processes, memory, user namespaces) and rerun") from None
    raise AssertionError("unreachable")


def _run_once(sandbox: Sandbox, program: str, tests: CodeTests, time_limit_s: float, startup_s: float) -> CodeOutcome:
    total = len(tests)
    max_output = sandbox.config.max_output_bytes
    job = json.dumps({"program": program, "fn_name": tests.fn_name, "inputs": list(tests.inputs), "max_output_bytes": max_output})
    frames = _Frames(max_output + (1 << 16))
    outcome = lambda kind, test=None, message="": CodeOutcome(kind, test, total, message)  # noqa: E731
    try:
        run = sandbox.start(
            harness_source(), job, cpu_time_s=startup_s + (total + 1) * time_limit_s, max_stdout_bytes=(total + 1) * (max_output + (1 << 16))
        )
    except OSError as exc:
        raise _SandboxBroken(f"could not start a program ({exc})") from None
    with run:
        deadline = run.started + startup_s + time_limit_s
        current: int | None = None  # the test running now; None: loading the program
        while True:
            data = run.read(deadline)
            for meta, payload in frames.feed(data):
                if meta.get("event") == "ready":
                    if meta.get("status"):
                        return outcome(meta["status"], None, meta.get("error", ""))
                    current = 0
                elif meta.get("event") == "test" and meta.get("index") == current:
                    if meta["status"] != "ok":
                        return outcome(meta["status"], current, meta.get("error", ""))
                    if tests.fn_name is None:
                        reason = stdout_mismatch(payload.decode("utf-8", "replace"), tests.outputs[current])
                    else:
                        reason = _value_mismatch(payload, meta, tests.outputs[current])
                    if reason:
                        return outcome("wrong_answer", current, reason)
                    current += 1
                    if current == total:
                        return outcome("passed")
                else:
                    return outcome("runtime_error", current, "the program wrote into the harness's report channel")
                deadline = time.monotonic() + time_limit_s
            if frames.garbled:
                return outcome("runtime_error", current, f"the program wrote into the harness's report channel ({frames.garbled})")
            if run.stdout_closed:  # the harness ended before the last test: the program ended it
                result = run.finish()
                if result.status is SandboxStatus.SANDBOX_ERROR:
                    raise _SandboxBroken(result.message)
                kind = _CRASH_KINDS.get(result.status, "runtime_error")
                return outcome(kind, current, result.message or f"the program ended the test harness (exit code {result.exit_code})")
            if time.monotonic() >= deadline:
                run.kill(SandboxStatus.TIMEOUT)
                return outcome("timeout", current, f"over {time_limit_s:g} s")
