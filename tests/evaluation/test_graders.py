"""Graders on realistic AIME / MATH answer forms, with the verdict a human grader would give."""

from __future__ import annotations

import threading

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.evaluation.graders import last_boxed, make_grader, strip_thinking, grade_response

# (reference answer, model response, correct?)
MATH_TABLE = [
    # fractions and decimals
    (r"\frac{1}{2}", r"The probability is $\boxed{0.5}$.", True),
    (r"\frac{1}{2}", r"so we get $\boxed{\frac12}$", True),
    ("1/2", r"Hence $p = \boxed{\dfrac{1}{2}}$.", True),
    ("0.5", r"\boxed{1/2}", True),
    (r"\frac{3}{4}", r"\boxed{\tfrac{3}{4}}", True),
    (r"\frac{3}{4}", r"\boxed{0.75}", True),
    (r"\frac{1}{3}", r"\boxed{0.33}", False),
    (r"\frac{2}{3}", r"\boxed{\frac{3}{2}}", False),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", True),
    # integers, AIME's leading zeros, near misses
    ("2", r"\boxed{20}", False),
    ("20", r"\boxed{2}", False),
    ("033", r"The answer is $\boxed{33}$.", True),
    ("33", r"\boxed{033}", True),
    ("007", r"Therefore the answer is \boxed{7}.", True),
    ("070", r"\boxed{7}", False),
    ("204", r"\boxed{204}", True),
    ("204", r"\boxed{240}", False),
    ("1000", r"\boxed{1,000}", True),
    ("1,000", r"\boxed{1000}", True),
    ("25", r"\boxed{25.0}", True),
    # \boxed{} inside longer text: the last box is the answer
    ("204", r"First I guessed \boxed{100}. Rechecking, the final answer is \boxed{204}.", True),
    ("100", r"First I guessed \boxed{100}. Rechecking, the final answer is \boxed{204}.", False),
    ("17", "We have $a+b=17$ and the area is\n\n**Final Answer**\n\\[\n\\boxed{17}\n\\]", True),
    ("12", r"Let $x=3$. Then $4x = \boxed{12}$ and we are done.", True),
    (r"\frac{7}{2}", r"the answer is \boxed{\frac{7}{2}} (as a fraction)", True),
    # no box: the final expression
    ("3", "Adding these up, the answer is 3.", True),
    ("42", "The final answer is 42.", True),
    ("42", "I think it's 41.", False),
    # units and percents
    ("10", r"\boxed{10\text{ cm}}", True),
    ("10", r"\boxed{10 \text{ meters}}", True),
    ("45", r"\boxed{45^\circ}", True),
    ("45", r"\boxed{45^{\circ}}", True),
    ("12", r"\boxed{\$12}", True),
    # negative numbers
    ("-5", r"Thus $x = \boxed{-5}$.", True),
    ("5", r"\boxed{-5}", False),
    ("-5", r"\boxed{5}", False),
    (r"-\frac{1}{2}", r"\boxed{-0.5}", True),
    # intervals
    ("[1,3)", r"$x \in \boxed{[1,3)}$", True),
    ("[1,3)", r"\boxed{(1,3)}", False),
    ("(1,3]", r"\boxed{(1, 3]}", True),
    (r"(-\infty, 2]", r"\boxed{(-\infty,2]}", True),
    (r"(-\infty, 2]", r"\boxed{(-\infty,2)}", False),
    # radicals, pi, expressions
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", True),
    (r"\sqrt{2}", r"\boxed{\sqrt 2}", True),
    (r"\sqrt{3}", r"\boxed{\sqrt{2}}", False),
    (r"4\pi", r"\boxed{4 \pi}", True),
    ("x^2+1", r"\boxed{1+x^2}", True),
    # broken or missing answers
    ("7", r"the answer is \boxed{7", False),  # box never closed (cut off)
    ("7", r"\boxed{}", False),
    ("7", "", False),
    # reasoning blocks: only the text after </think> counts
    ("7", r"<think>maybe \boxed{8}? no...</think>The answer is \boxed{7}.", True),
    ("8", r"<think>maybe \boxed{8}? no...</think>The answer is \boxed{7}.", False),
    ("8", r"<think>so it is \boxed{8}", False),  # thinking never finished: no answer
]


def test_table_is_big_enough():
    assert len(MATH_TABLE) >= 40
    assert {v for *_, v in MATH_TABLE} == {True, False}


@pytest.mark.parametrize("answer,response,expected", MATH_TABLE)
def test_math_grader_table(answer, response, expected):
    grader = make_grader("math")
    verdict = grade_response(grader, grader.prepare(answer), response)
    assert verdict.correct is expected, (answer, response, verdict)


def test_math_grader_extracts_the_last_box_only():
    grader = make_grader("math")
    v = grade_response(grader, grader.prepare("100"), r"\boxed{204} and later \boxed{100}")
    assert v.correct and v.extracted == "100"  # math-verify alone would read the tuple (204, 100)


def test_math_grader_works_off_the_main_thread():
    # math-verify's timeout uses SIGALRM, which only the main thread may set.
    grader = make_grader("math")
    out = []
    t = threading.Thread(target=lambda: out.append(grade_response(grader, grader.prepare("1/2"), r"\boxed{0.5}").correct))
    t.start()
    t.join()
    assert out == [True]


def test_last_boxed_and_strip_thinking():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \fbox{x^{2}} c") == "x^{2}"
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"  # unclosed last box is skipped
    assert last_boxed("no box") is None
    assert strip_thinking("<think>a</think>b</think>c") == "c"
    assert strip_thinking("<think>never closed") == ""
    assert strip_thinking("plain") == "plain"


@pytest.mark.parametrize(
    "answer,response,ignore_case,expected",
    [
        ("Paris", "Paris", False, True),
        ("Paris", "  Paris \n", False, True),
        ("New  York", "New York", False, True),
        ("Paris", "paris", False, False),
        ("Paris", "paris", True, True),
        ("Paris", "Paris.", False, False),
        ("12", "012", False, False),
        ("x", "", False, False),
    ],
)
def test_exact_grader(answer, response, ignore_case, expected):
    grader = make_grader("exact", ignore_case=ignore_case)
    assert grade_response(grader, grader.prepare(answer), response).correct is expected


@pytest.mark.parametrize(
    "answer,response,expected,extracted",
    [
        ("42", "7*6 #42", True, "42"),
        ("-3", "1-4 #-3", True, "-3"),
        ("3", "1-4 #-3", False, "-3"),
        ("5", "#4 then corrected #5", True, "5"),  # last match counts
        ("4", "#4 then corrected #5", False, "5"),
        ("42", "forty-two", False, None),
        (" 42 ", "#42", True, "42"),
    ],
)
def test_regex_grader(answer, response, expected, extracted):
    grader = make_grader("regex", answer_pattern=r"#(-?\d+)")
    verdict = grade_response(grader, grader.prepare(answer), response)
    assert (verdict.correct, verdict.extracted) == (expected, extracted)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="regex"), "needs an answer pattern"),
        (dict(name="regex", answer_pattern=r"#-?\d+"), "no capture group"),
        (dict(name="regex", answer_pattern="#(["), "not a valid regex"),
        (dict(name="fuzzy"), "unknown grader"),
    ],
)
def test_grader_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_grader(**kwargs)


# ---------------------------------------------------------------------------------------
# Verdict.detail, the code grader's registration, prepare_answers and grade_batch


def test_verdict_detail_is_optional_and_unset_by_the_answer_graders():
    from megatron_lopd.evaluation.graders import GRADERS, Verdict

    assert Verdict("1", True) == Verdict("1", True, None) and "code" in GRADERS
    for grader, answer, response in [(make_grader("exact"), "a", "a"), (make_grader("regex", answer_pattern=r"#(\d+)"), "1", "#1"), (make_grader("math"), "1", r"\boxed{1}")]:
        assert grade_response(grader, grader.prepare(answer), response).detail is None


def _code_grader():
    from megatron_lopd.evaluation.sandbox import SandboxConfig

    try:
        return make_grader("code", sandbox=SandboxConfig(max_output_mb=1))
    except ConfigError as exc:
        pytest.skip(f"this machine cannot isolate programs: {exc}")


def test_make_grader_code_grades_through_the_sandbox():
    grader = _code_grader()
    prepared = grader.prepare('{"tests": [{"input": "2\\n", "output": "4\\n"}]}')
    verdict = grade_response(grader, prepared, "<think>maybe ```python\nprint(5)\n```</think>```python\nprint(int(input()) * 2)\n```")
    assert (verdict.correct, verdict.detail, verdict.extracted) == (True, "passed", "print(int(input()) * 2)")
    thinking_only = grade_response(grader, prepared, "<think>```python\nprint(int(input()) * 2)\n```")
    assert (thinking_only.correct, thinking_only.detail) == (False, "no_code")  # reasoning never finished


def test_prepare_answers_names_the_problem():
    from megatron_lopd.errors import ArtifactError
    from megatron_lopd.evaluation.graders import prepare_answers

    grader = _code_grader()
    good = '{"tests": [{"input": "", "output": "1"}]}'
    assert len(prepare_answers(grader, [("p1", good), ("p2", good)])) == 2
    with pytest.raises(ArtifactError, match=r"^problem 'p2': code tests: the problem has no tests") as caught:
        prepare_answers(grader, [("p1", good), ("p2", '{"tests": []}')])
    assert caught.value.fix
    assert prepare_answers(make_grader("exact"), [("a", "Paris")]) == ["Paris"]


class _RecordingGrader:
    """A grader that records the thread it grades in (and fails on request)."""

    name = "recording"

    def __init__(self, parallel: bool):
        self.parallel = parallel
        self.threads: list[str] = []

    def prepare(self, answer: str) -> str:
        return answer

    def grade(self, prepared: str, response: str):
        from megatron_lopd.evaluation.graders import Verdict

        if response == "fail":
            raise ValueError("grading failed")
        self.threads.append(threading.current_thread().name)
        return Verdict(response, response == prepared)


def test_grade_batch_order_threads_and_errors():
    from megatron_lopd.evaluation.graders import grade_batch

    items = [(str(i % 3), f"<think>x</think>{i % 2}") for i in range(12)]
    expected = [grade_response(_RecordingGrader(False), p, r) for p, r in items]
    serial = _RecordingGrader(parallel=False)
    assert grade_batch(serial, items, workers=4) == expected
    assert set(serial.threads) == {threading.current_thread().name}  # e.g. math-verify needs the main thread
    threaded = _RecordingGrader(parallel=True)
    assert grade_batch(threaded, items, workers=3, progress=True) == expected
    assert threading.current_thread().name not in threaded.threads
    with pytest.raises(ValueError, match="grading failed"):
        grade_batch(_RecordingGrader(parallel=True), items[:3] + [("0", "fail")] + items[3:], workers=2)
    with pytest.raises(ConfigError, match="workers=0"):
        grade_batch(serial, items, workers=0)
