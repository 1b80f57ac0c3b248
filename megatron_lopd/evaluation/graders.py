"""Answer graders: is a model's response correct given the reference answer?

- `math`: Hugging Face's math-verify. The final answer is the last `\\boxed{}` of the
  response (after any think block), else the last expression math-verify finds; it is
  compared symbolically, so `\\frac{1}{2}`, `0.5` and `1/2` agree and `2` vs `20` do not.
- `exact`: the response's final text equals the answer (whitespace collapsed; case
  folded with `ignore_case`).
- `regex`: the last match of a pattern's first capture group equals the answer (for
  synthetic tasks, e.g. `#(-?\\d+)`).
- `code`: the response's last Python code block passes every test of the answer (JSON, see
  `evaluation/code.py`), run in the sandbox (`evaluation/sandbox.py`); the verdict's
  `detail` says which test failed and how.

A grader sees the response text *after* reasoning: everything up to the last
`</think>` is dropped, and a think block that never closed leaves no answer.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.evaluation.code import DEFAULT_TIME_LIMIT_S, HARNESS_PRELOAD, CodeTests, extract_program, parse_code_tests, run_tests
from megatron_lopd.evaluation.sandbox import Sandbox, SandboxConfig

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
GRADERS = ("math", "exact", "regex", "code")


def strip_thinking(text: str) -> str:
    """The part of a response after its reasoning: text after the last `</think>`;
    empty if a `<think>` never closed (the model ran out of budget while thinking)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return ""
    return text


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; None if there is none."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[start:pos]
    return None  # no box, or only unclosed ones (a truncated response)


@dataclass(frozen=True)
class Verdict:
    extracted: str | None  # the answer found in the response (None: no answer found)
    correct: bool
    detail: str | None = None  # how it was judged, where a grader says more (code: "wrong_answer: test 3/12: ...")


class Grader(Protocol):
    name: str

    def prepare(self, answer: str) -> Any:
        """Parse a reference answer once per problem (grading then runs once per sample)."""

    def grade(self, prepared: Any, response: str) -> Verdict:
        """Grade one response (already stripped of its reasoning)."""


def _collapse(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class ExactGrader:
    ignore_case: bool = False
    name: str = "exact"

    def _norm(self, text: str) -> str:
        text = _collapse(text)
        return text.casefold() if self.ignore_case else text

    def prepare(self, answer: str) -> str:
        return self._norm(answer)

    def grade(self, prepared: str, response: str) -> Verdict:
        extracted = _collapse(response)
        return Verdict(extracted or None, bool(extracted) and self._norm(response) == prepared)


@dataclass(frozen=True)
class RegexGrader:
    pattern: str
    ignore_case: bool = False
    name: str = "regex"

    def __post_init__(self):
        try:
            compiled = re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"answer pattern {self.pattern!r} is not a valid regex ({exc})", "fix --answer-pattern") from exc
        if compiled.groups < 1:
            raise ConfigError(
                f"answer pattern {self.pattern!r} has no capture group",
                "put the answer in parentheses, e.g. --answer-pattern '#(-?\\d+)'",
            )
        object.__setattr__(self, "_compiled", compiled)

    def _norm(self, text: str) -> str:
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def prepare(self, answer: str) -> str:
        return self._norm(answer)

    def grade(self, prepared: str, response: str) -> Verdict:
        found = [m.group(1) for m in self._compiled.finditer(response) if m.group(1) is not None]
        if not found:
            return Verdict(None, False)
        return Verdict(found[-1], self._norm(found[-1]) == prepared)


@dataclass(frozen=True)
class MathGrader:
    """math-verify: symbolic comparison of the final answer with the reference."""

    timeout_s: int = 5  # per parse / verify; math-verify's timeout needs the main thread (SIGALRM)
    name: str = "math"

    def _timeout(self) -> int | None:
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def prepare(self, answer: str):
        from math_verify import parse

        answer = answer.strip()
        # A bare reference ("033", "(1,3]", "\frac{1}{2}") is read as LaTeX math; parsing it as
        # free text would turn "(1,3]" into nothing and "[1, 3)" into 3.
        candidates = [answer] if ("$" in answer or "\\boxed" in answer) else [f"${answer}$", answer]
        for text in candidates:
            parsed = parse(text, parsing_timeout=self._timeout())
            if parsed:
                return parsed
        return [answer]  # unparseable reference: math-verify falls back to string comparison

    def grade(self, prepared, response: str) -> Verdict:
        from math_verify import parse, verify

        boxed = last_boxed(response)
        if boxed is not None and not boxed.strip():
            return Verdict(None, False)
        # Only the last box counts: math-verify would join several boxes into one tuple.
        parsed = parse(response if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=self._timeout())
        if not parsed:
            return Verdict(None, False)
        extracted = next((p for p in parsed if isinstance(p, str)), str(parsed[0]))
        return Verdict(extracted, bool(verify(prepared, parsed, timeout_seconds=self._timeout())))


@dataclass(frozen=True)
class CodeGrader:
    """The response's program passes every test (LiveCodeBench's rules, `evaluation/code.py`),
    run in the sandbox. Construction checks the sandbox works here (ConfigError if not)."""

    sandbox: SandboxConfig = SandboxConfig()
    default_time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per test, for problems that set none
    name: str = "code"
    parallel: ClassVar[bool] = True  # grading runs subprocesses: `grade_batch` may use threads

    def __post_init__(self):
        if not self.default_time_limit_s > 0:
            raise ConfigError(f"code time limit {self.default_time_limit_s} is not positive", "use a time limit > 0 seconds")
        object.__setattr__(self, "_sandbox", Sandbox(self.sandbox, preload=HARNESS_PRELOAD))

    def prepare(self, answer: str) -> CodeTests:
        tests = parse_code_tests(answer)
        if tests.fn_name is None:
            largest = max(len(text.encode()) for text in tests.inputs)
            if largest > self.sandbox.max_output_bytes:
                raise ConfigError(
                    f"code tests: an input of {largest} bytes is over the sandbox's file size limit ({self.sandbox.max_output_bytes} bytes)",
                    "raise the sandbox's max_output_mb",
                )
        return tests

    def grade(self, prepared: CodeTests, response: str) -> Verdict:
        program = extract_program(response)
        if program is None:
            return Verdict(None, False, "no_code")
        outcome = run_tests(self._sandbox, program, prepared, time_limit_s=prepared.time_limit_s or self.default_time_limit_s)
        return Verdict(program, outcome.passed, outcome.detail)


_FACTORIES: dict[str, Callable[..., Grader]] = {
    "math": lambda answer_pattern=None, ignore_case=False, sandbox=None: MathGrader(),
    "exact": lambda answer_pattern=None, ignore_case=False, sandbox=None: ExactGrader(ignore_case=ignore_case),
    "regex": lambda answer_pattern=None, ignore_case=False, sandbox=None: RegexGrader(_require_pattern(answer_pattern), ignore_case),
    "code": lambda answer_pattern=None, ignore_case=False, sandbox=None: CodeGrader(sandbox or SandboxConfig()),
}


def _require_pattern(pattern: str | None) -> str:
    if not pattern:
        raise ConfigError("the regex grader needs an answer pattern", "pass --answer-pattern with one capture group, e.g. '#(-?\\d+)'")
    return pattern


def make_grader(
    name: str, *, answer_pattern: str | None = None, ignore_case: bool = False, sandbox: SandboxConfig | None = None
) -> Grader:
    """`sandbox`: the code grader's sandbox settings (default SandboxConfig())."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown grader {name!r}", f"use one of {', '.join(GRADERS)}")
    return _FACTORIES[name](answer_pattern=answer_pattern, ignore_case=ignore_case, sandbox=sandbox)


def grade_response(grader: Grader, prepared: Any, response: str) -> Verdict:
    """Grade a full response: reasoning stripped first."""
    return grader.grade(prepared, strip_thinking(response))


def prepare_answers(grader: Grader, answers: Sequence[tuple[str, str]]) -> list[Any]:
    """`grader.prepare` for every (problem id, reference answer), errors naming the problem:
    run it before sampling, so that a bad answer fails at once."""
    prepared = []
    for problem_id, answer in answers:
        try:
            prepared.append(grader.prepare(answer))
        except LopdError as exc:
            raise type(exc)(f"problem {problem_id!r}: {exc.what}", exc.fix) from None
        except Exception as exc:  # a grader library's own parse error
            raise ArtifactError(f"problem {problem_id!r}: the {grader.name} grader cannot read the answer ({exc})", "fix the answer") from None
    return prepared


def grade_batch(grader: Grader, items: Sequence[tuple[Any, str]], *, workers: int = 1, progress: bool = False) -> list[Verdict]:
    """`grade_response` for every (prepared answer, response), in order. Graders that run
    programs (`parallel`) use `workers` threads, each driving one sandboxed process at a
    time; the others grade in this thread (math-verify's timeout needs the main thread)."""
    if workers < 1:
        raise ConfigError(f"grading workers={workers} is below 1", "use --code-workers >= 1")
    from tqdm.auto import tqdm

    with tqdm(total=len(items), unit="sample", desc=f"grade ({grader.name})", disable=not progress, dynamic_ncols=True) as bar:
        if workers == 1 or not getattr(grader, "parallel", False) or len(items) < 2:
            verdicts = []
            for prepared, response in items:
                verdicts.append(grade_response(grader, prepared, response))
                bar.update()
            return verdicts
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"grade-{grader.name}") as pool:
            futures = [pool.submit(grade_response, grader, prepared, response) for prepared, response in items]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
            return [future.result() for future in futures]
