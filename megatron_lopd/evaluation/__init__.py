"""Evaluation: K samples per problem, graded (math-verify, exact, regex), avg@K and pass@k."""

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
from megatron_lopd.runtime.shards import Shard

__all__ = [
    "GRADERS",
    "MATH_PROMPT_TEMPLATE",
    "EvalConfig",
    "EvalSummary",
    "Problem",
    "Shard",
    "Verdict",
    "evaluate",
    "grade_response",
    "load_problems",
    "make_grader",
    "merge_shards",
    "pass_at_k",
    "read_results",
    "run_eval",
]
