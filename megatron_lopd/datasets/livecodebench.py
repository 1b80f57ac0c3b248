"""LiveCodeBench `code_generation_lite` rows -> code problems in the code grader's test format.

Published layout (livecodebench/code_generation_lite, `test.jsonl` ... `test6.jsonl`): one row per
problem with `question_title`, `question_content`, `platform` (leetcode | atcoder | codeforces),
`question_id`, `contest_id`, `contest_date` (ISO, e.g. `2024-08-03T00:00:00`), `starter_code`
(empty for stdin problems), `difficulty`, `public_test_cases` (a JSON list of `{input, output,
testtype}`, testtype `stdin` or `functional`), `private_test_cases` (the same list as JSON, or, in
the lite files, base64 of zlib-compressed pickle of that JSON string) and `metadata` (JSON;
`func_name` for functional problems).

A release is a window of contest dates, `start <= contest_date <= end` (both ends included, as
LiveCodeBench's own loader filters `--start_date/--end_date`). The answer of a problem is the JSON
text `{"tests": [{"input", "output"}, ...], "fn_name": null | str}`: public tests, then private.
The prompt is the problem statement followed by how to answer: complete the given starter code
(functional problems), or write a program that reads stdin and writes stdout; either way the
solution goes into one fenced Python block.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from megatron_lopd.datasets.columns import Example, missing_key
from megatron_lopd.datasets.rows import Row
from megatron_lopd.errors import ArtifactError, ConfigError

COLUMNS = ("question_id", "question_title", "question_content", "contest_date", "starter_code", "public_test_cases",
           "private_test_cases", "metadata")

STARTER_CODE_INSTRUCTION = (
    "Solve the problem in Python 3 by completing the starter code below. Reply with the complete solution in a single "
    "```python code block."
)
STDIN_INSTRUCTION = (
    "Solve the problem in Python 3 with a program that reads the input from standard input and writes the answer to "
    "standard output; do not hard-code the examples. Reply with the complete program in a single ```python code block."
)


def parse_date(text: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=None)  # LiveCodeBench's dates are naive: compare them so
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a date", "write dates as YYYY-MM-DD") from None


@dataclass(frozen=True)
class DateWindow:
    """Contest dates `start <= date <= end` (ISO dates; None: open on that side)."""

    start: str | None = None
    end: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DateWindow":
        """`START:END` (either side may be empty), as `--lcb-window` takes it."""
        start, sep, end = text.partition(":")
        if not sep:
            raise ConfigError(f"LiveCodeBench window {text!r} is not START:END", "write e.g. --lcb-window 2024-08-01:2025-02-01")
        window = cls(start.strip() or None, end.strip() or None)
        window.bounds()  # refuse bad dates now
        return window

    def bounds(self) -> tuple[datetime | None, datetime | None]:
        lo = parse_date(self.start, "window start") if self.start else None
        hi = parse_date(self.end, "window end") if self.end else None
        if lo and hi and lo > hi:
            raise ConfigError(f"LiveCodeBench window {self.start}:{self.end} ends before it starts", "swap the dates")
        return lo, hi

    def __str__(self) -> str:
        return f"{self.start or ''}:{self.end or ''}"


def _json_field(row: Row, key: str) -> Any:
    value = row.data.get(key)
    if value is None:
        raise missing_key(row, key, "--format")
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{row.where}: {key!r} is not valid JSON ({exc.msg})", "download the file again") from None


class _StringsOnly(pickle.Unpickler):
    """The private tests are a pickled string: no class may be loaded (no code runs)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def decode_private_tests(value: Any, row: Row) -> list[dict]:
    """`private_test_cases`: a JSON list, or base64(zlib(pickle(JSON text))) in the lite files."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise missing_key(row, "private_test_cases", "--format")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(value.encode(), validate=True)))).load()
        tests = json.loads(text)
    except Exception as exc:  # binascii, zlib, pickle and json errors alike: a damaged field
        raise ArtifactError(f"{row.where}: 'private_test_cases' is neither JSON nor base64(zlib(pickle(JSON))) ({type(exc).__name__}: {exc})",
                            "download the file again") from None
    if not isinstance(tests, list):
        raise ArtifactError(f"{row.where}: 'private_test_cases' decodes to a {type(tests).__name__}, not a list of tests", "download the file again")
    return tests


def _tests(cases: Any, row: Row, key: str) -> list[dict[str, str]]:
    if not isinstance(cases, list):
        raise ArtifactError(f"{row.where}: {key!r} is a {type(cases).__name__}, not a list of tests", "download the file again")
    out = []
    for case in cases:
        if not (isinstance(case, dict) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
            raise ArtifactError(f"{row.where}: {key!r} has a test without string 'input' and 'output'", "download the file again")
        out.append({"input": case["input"], "output": case["output"]})
    return out


def code_prompt(question: str, starter_code: str) -> str:
    """The user message: the statement, then how to answer (starter code or stdin/stdout)."""
    if starter_code.strip():
        return f"{question}\n\n{STARTER_CODE_INSTRUCTION}\n\n```python\n{starter_code}\n```"
    return f"{question}\n\n{STDIN_INSTRUCTION}"


@dataclass(frozen=True)
class LiveCodeBenchRows:
    """Reads code_generation_lite rows; rows outside `window` are skipped (None returned)."""

    window: DateWindow = DateWindow()

    def top_level_fields(self) -> set[str]:
        return set(COLUMNS)

    def example(self, row: Row, *, with_answer: bool) -> Example | None:
        data = row.data
        for key in ("question_id", "question_content", "contest_date"):
            if not isinstance(data.get(key), str):
                raise missing_key(row, key, "--format")
        lo, hi = self.window.bounds()
        date = parse_date(data["contest_date"], f"{row.where}: contest_date")
        if (lo is not None and date < lo) or (hi is not None and date > hi):
            return None
        question, starter = data["question_content"], data.get("starter_code") or ""
        answer = None
        if with_answer:
            metadata = _json_field(row, "metadata")
            fn_name = metadata.get("func_name") if isinstance(metadata, dict) else None
            tests = _tests(_json_field(row, "public_test_cases"), row, "public_test_cases")
            tests += _tests(decode_private_tests(data.get("private_test_cases"), row), row, "private_test_cases")
            if not tests:
                raise ArtifactError(f"{row.where}: problem {data['question_id']!r} has no tests", "download the file again")
            answer = json.dumps({"tests": tests, "fn_name": fn_name}, ensure_ascii=False)
        messages = ({"role": "user", "content": code_prompt(question, starter)},)
        return Example(id=data["question_id"], where=row.where, text=question, messages=messages, answer=answer)
