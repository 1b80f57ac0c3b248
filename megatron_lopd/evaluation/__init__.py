"""Evaluation: K samples per problem, graded (math-verify, exact, regex, code), avg@K and pass@k;
suites of benchmarks (`suite.py`) into one table."""

from megatron_lopd.evaluation.evaluate import (
    MATH_PROMPT_TEMPLATE,
    EvalConfig,
    EvalSummary,
    Problem,
    evaluate,
    load_problems,
    merge_shards,
    read_results,
    run_eval,
)
from megatron_lopd.evaluation.graders import GRADERS, Verdict, grade_response, make_grader
from megatron_lopd.evaluation.metrics import pass_at_k
from megatron_lopd.evaluation.suite import SUITES, Benchmark, Suite, SuiteReport, SuiteRun, load_suite, read_suite, run_suite, suite_run
from megatron_lopd.runtime.shards import Shard

__all__ = [
    "GRADERS",
    "MATH_PROMPT_TEMPLATE",
    "SUITES",
    "Benchmark",
    "EvalConfig",
    "EvalSummary",
    "Problem",
    "Shard",
    "Suite",
    "SuiteReport",
    "SuiteRun",
    "Verdict",
    "evaluate",
    "grade_response",
    "load_problems",
    "load_suite",
    "make_grader",
    "merge_shards",
    "pass_at_k",
    "read_results",
    "read_suite",
    "run_eval",
    "run_suite",
    "suite_run",
]
