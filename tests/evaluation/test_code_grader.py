"""The code grader (LiveCodeBench rules) on hand-checked program/test pairs, and on hostile
programs: each graded wrong with the reason while the evaluation goes on, the host clean after."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.evaluation.code import OUTCOMES, extract_program, parse_code_tests, stdout_mismatch
from megatron_lopd.evaluation.graders import CodeGrader, grade_batch
from megatron_lopd.evaluation.sandbox import ENV_MARKER, SandboxConfig

SUM = json.dumps({"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}, {"input": "0 0\n", "output": "0\n"}]})
SUM_1S = json.dumps({**json.loads(SUM), "time_limit_s": 1})  # the grader's default is 3 s per test
COUNT = json.dumps({"tests": [{"input": "3\n", "output": "1\n2\n3\n"}]})
THIRD = json.dumps({"tests": [{"input": "1 3\n", "output": "0.333333333\n"}]})
TWO_SUM = json.dumps({"tests": [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]"}, {"input": "[3, 2, 4]\n6", "output": "[1, 2]"}], "fn_name": "twoSum"})
TWO_SUM_1S = json.dumps({**json.loads(TWO_SUM), "time_limit_s": 1})
REVERSE = json.dumps({"tests": [{"input": '"abc"', "output": '"cba"'}], "fn_name": "reverse"})


def py(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n\n```{tag}\n{code}\n```\n"


SOLVE_TWO_SUM = """class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i"""

# (name, answer, response, expected detail: its beginning)
TABLE = [
    # stdin problems: correct programs in the usual idioms
    ("input_split", SUM, py("a, b = map(int, input().split())\nprint(a + b)"), "passed"),
    ("readline", SUM, py("import sys\na, b = map(int, sys.stdin.readline().split())\nprint(a + b)"), "passed"),
    ("open_0", SUM, py("a, b = map(int, open(0).read().split())\nprint(a + b)"), "passed"),
    ("buffer", SUM, py("import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.buffer.write(b'%d\\n' % (a + b))"), "passed"),
    ("main_guard", SUM, py("def main():\n    a, b = map(int, input().split())\n    print(a + b)\n\nif __name__ == '__main__':\n    main()"), "passed"),
    ("implicit_imports", SUM, py("q = deque(map(int, stdin.readline().split()))\nprint(sum(q))"), "passed"),  # LiveCodeBench pre-imports
    ("thread_with_big_stack", SUM, py("import threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\nthreading.stack_size(1 << 26)\nthreading.Thread(target=main).start()"), "passed"),
    ("deep_recursion", SUM, py("def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\na, b = map(int, input().split())\nprint(a + b + f(20000) - 20000)"), "passed"),
    ("sys_exit_0", SUM, py("import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)"), "passed"),
    ("sys_exit_1", SUM, py("import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(1)"), "passed"),  # SystemExit ends a test normally
    ("no_newline", SUM, py("import sys\na, b = map(int, input().split())\nsys.stdout.write(str(a + b))"), "passed"),
    # whitespace and number forms the comparison forgives
    ("trailing_spaces", SUM, py("a, b = map(int, input().split())\nprint(a + b, end='   \\n')"), "passed"),
    ("leading_spaces", SUM, py("a, b = map(int, input().split())\nprint('  ', a + b)"), "passed"),
    ("blank_lines_after", SUM, py("a, b = map(int, input().split())\nprint(a + b)\nprint()\nprint()"), "passed"),
    ("crlf", SUM, py("import sys\na, b = map(int, input().split())\nsys.stdout.write(f'{a + b}\\r\\n')"), "passed"),
    ("decimal_form", SUM, py("a, b = map(int, input().split())\nprint(f'{a + b:.1f}')"), "passed"),  # 3.0 == 3 as exact decimals
    ("nine_decimals", THIRD, py("a, b = map(int, input().split())\nprint(f'{a / b:.9f}')"), "passed"),
    ("trailing_zero_decimal", THIRD, py("print('0.3333333330')"), "passed"),
    ("lines", COUNT, py("for i in range(1, int(input()) + 1):\n    print(i)"), "passed"),
    # wrong answers
    ("difference", SUM, py("a, b = map(int, input().split())\nprint(a - b)"), "wrong_answer: test 1/3: line 1: got '-1', expected '3'"),
    ("partial_pass", SUM, py("a, b = map(int, input().split())\nprint(abs(a) + abs(b))"), "wrong_answer: test 2/3: line 1: got '14', expected '6'"),
    ("debug_line", SUM, py("a, b = map(int, input().split())\nprint('sum:')\nprint(a + b)"), "wrong_answer: test 1/3: 2 output lines, expected 1"),
    ("silent", SUM, py("a, b = map(int, input().split())"), "wrong_answer: test 1/3: line 1: got '', expected '3'"),
    ("one_line_not_three", COUNT, py("print(*range(1, int(input()) + 1))"), "wrong_answer: test 1/1: 1 output lines, expected 3"),
    ("float_repr", THIRD, py("a, b = map(int, input().split())\nprint(a / b)"), "wrong_answer: test 1/1: line 1: got '0.3333333333333333'"),
    ("fewer_decimals", THIRD, py("print('0.33333333')"), "wrong_answer:"),
    # timeouts, crashes, memory, output
    ("infinite_loop", SUM_1S, py("while True:\n    pass"), "timeout: test 1/3"),
    ("slow_on_test_2", SUM_1S, py("a, b = map(int, input().split())\nwhile a == 10:\n    pass\nprint(a + b)"), "timeout: test 2/3"),
    ("divide_by_zero", SUM, py("print(1 // 0)"), "runtime_error: test 1/3: ZeroDivisionError: integer division or modulo by zero"),
    ("crash_on_test_3", SUM, py("a, b = map(int, input().split())\nassert a, 'zero'\nprint(a + b)"), "runtime_error: test 3/3: AssertionError: zero"),
    ("index_error", COUNT, py("print([][1])"), "runtime_error: test 1/1: IndexError"),
    ("syntax_error", SUM, py("print(("), "runtime_error: loading the program: SyntaxError"),
    ("memory_balloon", SUM, py("x = [0] * (10 ** 10)"), "memory: test 1/3"),
    ("too_much_output", SUM, py("while True:\n    print('x' * 1000)"), "output_limit: test 1/3"),
    ("os_exit", SUM, py("import os\nprint(3, flush=True)\nos._exit(0)"), "runtime_error: test 1/3: the program ended the test harness"),
    # which code is the program
    ("no_code", SUM, "The answer is a + b.", "no_code"),
    ("cpp_only", SUM, "```cpp\nint main() { return 0; }\n```", "no_code"),
    ("last_block_wins", SUM, py("print(a - b)") + "\nBetter:\n" + py("a, b = map(int, input().split())\nprint(a + b)"), "passed"),
    ("last_block_wrong", SUM, py("a, b = map(int, input().split())\nprint(a + b)") + "\nOr:\n" + py("print(0)"), "wrong_answer: test 1/3:"),
    ("cpp_after_python", SUM, py("a, b = map(int, input().split())\nprint(a + b)") + "\nIn C++:\n```cpp\nint main() {}\n```", "passed"),
    ("unclosed_last_block", SUM, py("a, b = map(int, input().split())\nprint(a + b)") + "\n```python\nprint(0", "passed"),
    ("py_tag", SUM, py("a, b = map(int, input().split())\nprint(a + b)", tag="py"), "passed"),
    ("untagged", SUM, py("a, b = map(int, input().split())\nprint(a + b)", tag=""), "passed"),
    # functional (LeetCode) problems
    ("two_sum", TWO_SUM, py(SOLVE_TWO_SUM), "passed"),
    ("two_sum_tuple", TWO_SUM, py(SOLVE_TWO_SUM.replace("[seen[target - x], i]", "(seen[target - x], i)")), "passed"),
    ("two_sum_function", TWO_SUM, py("def twoSum(nums, target):\n    return next([i, j] for j in range(len(nums)) for i in range(j) if nums[i] + nums[j] == target)"), "passed"),
    ("two_sum_reversed", TWO_SUM, py(SOLVE_TWO_SUM.replace("[seen[target - x], i]", "[i, seen[target - x]]")), "wrong_answer: test 1/2: returned '[1, 0]', expected '[0, 1]'"),
    ("two_sum_set", TWO_SUM, py(SOLVE_TWO_SUM.replace("[seen[target - x], i]", "{seen[target - x], i}")), "wrong_answer: test 1/2: returned a value that is not JSON"),
    ("two_sum_prints", TWO_SUM, py(SOLVE_TWO_SUM.replace("return [seen[target - x], i]", "print([seen[target - x], i]); return")), "wrong_answer: test 1/2: returned 'null'"),
    ("two_sum_wrong_name", TWO_SUM, py(SOLVE_TWO_SUM.replace("def twoSum", "def two_sum")), "runtime_error: loading the program: AttributeError"),
    ("two_sum_crash_2", TWO_SUM, py(SOLVE_TWO_SUM.replace("seen = {}", "seen = {}\n        assert target != 6, 'six'")), "runtime_error: test 2/2: AssertionError: six"),
    ("two_sum_loop", TWO_SUM_1S, py("class Solution:\n    def twoSum(self, nums, target):\n        while True:\n            pass"), "timeout: test 1/2"),
    ("two_sum_bad_import", TWO_SUM, py("import numpyy\n" + SOLVE_TWO_SUM), "runtime_error: loading the program: ModuleNotFoundError"),
    ("two_sum_main_guard_skipped", TWO_SUM, py(SOLVE_TWO_SUM + "\n\nif __name__ == '__main__':\n    raise SystemExit(Solution().twoSum([1], 5))"), "passed"),
    ("reverse", REVERSE, py("class Solution:\n    def reverse(self, s: str) -> str:\n        return s[::-1]"), "passed"),
    ("reverse_wrong", REVERSE, py("class Solution:\n    def reverse(self, s: str) -> str:\n        return s"), "wrong_answer: test 1/1: returned '\"abc\"', expected '\"cba\"'"),
]


@pytest.fixture(scope="module")
def grader():
    try:
        grader = CodeGrader(SandboxConfig(memory_mb=512, max_output_mb=1), default_time_limit_s=3.0)
    except ConfigError as exc:
        pytest.skip(f"this machine cannot isolate programs: {exc}")
    yield grader
    grader._sandbox.close()


def test_table_is_big_and_varied():
    assert len(TABLE) >= 40 and len({name for name, *_ in TABLE}) == len(TABLE)
    kinds = {expected.split(":")[0] for *_, expected in TABLE}
    assert kinds == set(OUTCOMES)  # every kind of detail


@pytest.mark.parametrize("name,answer,response,expected", TABLE, ids=[row[0] for row in TABLE])
def test_code_grader_table(grader, name, answer, response, expected):
    verdict = grader.grade(grader.prepare(answer), response)
    assert verdict.detail.startswith(expected), (name, verdict.detail)
    assert verdict.correct is (expected == "passed")
    assert (verdict.extracted is None) is (expected == "no_code")


def test_grade_batch_in_parallel_equals_serial(grader):
    rows = [row for row in TABLE if not row[3].startswith(("timeout", "memory", "output_limit"))][::4]
    items = [(grader.prepare(answer), response) for _, answer, response, _ in rows]
    serial = grade_batch(grader, items, workers=1)
    parallel = grade_batch(grader, items, workers=2, progress=True)
    assert serial == parallel and [v.correct for v in serial] == [row[3] == "passed" for row in rows]


# ---------------------------------------------------------------------------------------
# Hostile programs through the grader


def test_hostile_programs_are_graded_wrong_and_evaluation_continues(grader, tmp_path, monkeypatch):
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    (fake_home / "secret.txt").write_text("s3cret")
    monkeypatch.setenv("HOME", str(fake_home))
    outside = [tmp_path / "escaped", Path(__file__).parent / "escaped-from-sandbox"]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    hostile = [
        ("infinite loop", py("while True:\n    pass"), "timeout: test 1/3"),
        ("fork bomb", py("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"), "timeout: test 1/3"),
        ("memory balloon", py("balloon = b'x' * (1 << 40)"), "memory: test 1/3"),
        ("a gigabyte of output", py("import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)"), "output_limit: test 1/3"),
        ("writes outside", py("".join(f"open({str(p)!r}, 'w').write('x')\n" for p in outside) + "print(3)"), "runtime_error: test 1/3: "),
        ("reads the home", py(f"print(open({str(fake_home / 'secret.txt')!r}).read())"), "runtime_error: test 1/3: FileNotFoundError"),
        ("opens a socket", py(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(3)"), "runtime_error: test 1/3: OSError: [Errno 101] Network is unreachable"),
        ("kills its parent", py(f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nos.killpg(0, signal.SIGKILL)"),
         "runtime_error: test 1/3: killed by signal SIGKILL"),
        ("the next, honest program", py("a, b = map(int, input().split())\nprint(a + b)"), "passed"),
    ]
    prepared = grader.prepare(SUM_1S)
    verdicts = grade_batch(grader, [(prepared, response) for _, response, _ in hostile], workers=2)
    for (name, _, expected), verdict in zip(hostile, verdicts):
        assert verdict.detail.startswith(expected), (name, verdict.detail)
        assert verdict.correct is (expected == "passed")
    # The host: nothing connected, nothing written outside, no process or zombie left.
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    assert not any(p.exists() for p in outside)
    _assert_no_sandbox_processes(grader)


def _assert_no_sandbox_processes(grader) -> None:
    import time

    marker = f"{ENV_MARKER}={os.getpid()}".encode()
    server = grader._sandbox.fork_server_pid
    deadline = time.monotonic() + 5
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == server:
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == server or marker in (entry / "environ").read_bytes().split(b"\0"):
                    left.append((entry.name, stat[0]))
            except OSError:
                continue
        if not left:
            return
        assert time.monotonic() < deadline, f"sandbox processes left behind: {left}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# Without the sandbox: the program in a response, comparing outputs, the tests format


@pytest.mark.parametrize(
    "response,program",
    [
        ("```python\nprint(1)\n```", "print(1)"),
        ("```Python\nprint(1)\n```", "print(1)"),
        ("```python3\nprint(1)\n```", "print(1)"),
        ("text\n```\nprint(1)\n```\nmore", "print(1)"),
        ("```python\nprint(1)\n```\n```python\nprint(2)\n```", "print(2)"),
        ("```python\nprint(1)\n```\n```java\nclass A {}\n```", "print(1)"),
        ("```python\nprint(1)\n```\n```python\nprint(2)", "print(1)"),  # the last one never closed
        ("````python\nx = '```'\n````", "x = '```'"),  # a longer fence
        ("  ```python\n  print(1)\n  ```", "  print(1)"),
        ("```python\n\n```", None),
        ("```cpp\nint x;\n```", None),
        ("no code at all", None),
        ("inline ```python print(1)``` only", None),
    ],
)
def test_extract_program(response, program):
    assert extract_program(response) == program


@pytest.mark.parametrize(
    "actual,expected,ok",
    [
        ("3\n", "3", True),
        ("  3  \n\n\n", "3\n", True),
        ("1 2\r\n3\r\n", "1 2\n3\n", True),
        ("1  2\n", "1 2\n", True),  # as decimals
        ("1.50 2\n", "1.5 2.0\n", True),
        ("1e2\n", "100\n", True),
        ("0.333333\n", "0.3333333\n", False),
        ("YES\n", "yes\n", False),
        ("1\n\n2\n", "1\n2\n", False),
        ("nan\n", "nan\n", True),  # equal text
        ("NaN 1\n", "nan 1\n", False),  # NaN is no decimal equal to anything
        ("", "\n", True),
        ("3\n4\n", "3\n", False),
    ],
)
def test_stdout_comparison(actual, expected, ok):
    assert (stdout_mismatch(actual, expected) is None) is ok


@pytest.mark.parametrize(
    "answer,message",
    [
        ("not json", "the answer is not JSON"),
        ("[1, 2]", "JSON list, not an object"),
        ('{"tests": []}', "has no tests"),
        ("{}", "has no tests"),
        ('{"tests": [{"input": "1"}]}', "test 1 is not an object with string 'input' and 'output'"),
        ('{"tests": [{"input": "1", "output": 1}]}', "test 1 is not an object"),
        ('{"tests": [{"input": "1", "output": "1"}], "fn-name": "f"}', "unknown key(s) ['fn-name']"),
        ('{"tests": [{"input": "1", "output": "1"}], "fn_name": "not a name"}', "not a Python identifier"),
        ('{"tests": [{"input": "1", "output": "1"}], "time_limit_s": 0}', "time_limit_s 0 is not a positive number"),
        ('{"tests": [{"input": "[1, 2", "output": "1"}], "fn_name": "f"}', "test 1: an argument line of a functional test is not JSON"),
        ('{"tests": [{"input": "1", "output": "[1"}], "fn_name": "f"}', "test 1: the expected output of a functional test is not JSON"),
    ],
)
def test_bad_tests_are_one_clear_error(answer, message):
    with pytest.raises(ArtifactError) as caught:
        parse_code_tests(answer)
    assert message in str(caught.value) and caught.value.fix and "\n" not in str(caught.value)


def test_parsed_tests():
    stdin = parse_code_tests(SUM)
    assert len(stdin) == 3 and stdin.inputs[1] == "10 -4\n" and stdin.outputs[1] == "6\n" and stdin.fn_name is None
    functional = parse_code_tests(TWO_SUM.replace('"fn_name"', '"time_limit_s": 2.5, "fn_name"'))
    assert functional.inputs[0] == [[2, 7, 11, 15], 9] and functional.outputs[1] == [1, 2] and functional.time_limit_s == 2.5


def test_input_over_the_file_size_limit_is_refused(grader):
    with pytest.raises(ConfigError, match="over the sandbox's file size limit"):
        grader.prepare(json.dumps({"tests": [{"input": "x" * (2 << 20), "output": ""}]}))


def test_a_program_writing_into_the_report_channel_is_a_runtime_error(grader):
    # The harness's private report descriptor is the lowest one above 2 at its start (3).
    forged = py("import os\nos.write(3, b'2 1\\n[]x' + b'garbage' * 10)\nprint(3)")
    verdict = grader.grade(grader.prepare(SUM), forged)
    assert not verdict.correct and verdict.detail.startswith("runtime_error: test 1/3: the program wrote into the harness's report channel")
