"""`lopd eval`: evaluate a Hugging Face model on a problem set (avg@K, pass@k), or on a suite of them.

    lopd eval --model HF_DIR --data aime24.jsonl --out runs/eval/aime24 -k 64 --max-tokens 32768
    lopd eval --model HF_DIR --data aime_2024.parquet --format aime24 --prompt-template math --out runs/eval/aime24 -k 64
    lopd eval ... --shard 0/4     # one of 4 processes (GPUs, SLURM tasks); the last one merges
    lopd eval --merge runs/eval/aime24   # merge shard outputs explicitly
    lopd eval --model HF_DIR --suite paper --out runs/eval/paper \\
        --suite-data aime24=aime_2024.parquet,aime25=AIME2025/,hmmt25=hmmt_feb_2025.parquet,lcb_v5=lcb/,lcb_v6=lcb/
    lopd eval ... --suite paper -k 2 --max-tokens 1024   # a smoke run: these apply to every benchmark

Samples are committed to DIR/progress/ every --batch-samples samples: rerunning the same
command after a crash resumes there; other settings into the same --out are refused
(--overwrite discards the earlier results). A suite evaluates each benchmark into DIR/NAME/ the
same way and writes DIR/suite.md and DIR/suite.json; a failing benchmark is listed with its
reason, the others go on, and the exit status is 1.
"""

from __future__ import annotations

import argparse

from megatron_lopd.cli import add_data_arguments, add_engine_arguments

# flag dest -> EvalConfig field, for the knobs a suite applies to every benchmark
_SUITE_KNOBS = {"samples_per_problem": "samples_per_problem", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                "seed": "seed", "thinking": "enable_thinking", "system_prompt": "system_prompt", "batch_samples": "batch_samples",
                "code_workers": "code_workers", "tensor_parallel": "tensor_parallel", "max_model_len": "max_model_len",
                "gpu_memory_utilization": "gpu_memory_utilization", "backend": "backend",
                "sandbox_allow_unisolated": "sandbox_allow_unisolated"}
# flags that describe one data file or its grading: a suite's benchmarks have their own
_PER_BENCHMARK = {"data": "--data", "format": "--format", "id_key": "--id-key", "prompt_key": "--prompt-key", "messages_key": "--messages-key",
                  "answer_key": "--answer-key", "lcb_window": "--lcb-window", "grader": "--grader", "answer_pattern": "--answer-pattern",
                  "prompt_template": "--prompt-template"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: K samples per problem, graded, avg@K and pass@k (one set or a suite)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="Hugging Face model directory")
    p.add_argument("--data", help="evaluation data: JSONL or parquet (or a directory of them); by default {id, problem | messages, answer}")
    add_data_arguments(p, default_format="problems", answers=True)
    p.add_argument("--suite", metavar="NAME|FILE", help="evaluate a suite of benchmarks instead: 'paper' (the Lightning OPD table) or a suite file")
    p.add_argument("--suite-data", action="append", default=[], metavar="NAME[:FORMAT]=PATH",
                   help="a suite benchmark's data (repeat, or separate with commas); FORMAT if the file is not in the benchmark's own layout")
    p.add_argument("--out", help="output directory (samples.jsonl, summary.json; a suite: one directory per benchmark, suite.md, suite.json)")
    p.add_argument("--merge", metavar="DIR", help="only merge DIR/shard-*-of-N/ into DIR and print the result")
    p.add_argument("-k", "--samples-per-problem", type=int, default=None, help="K samples per problem (default 1; a suite: each benchmark's own, paper 64)")
    p.add_argument("--max-tokens", type=int, default=None, help="response token budget (default 32768; a suite: each benchmark's own)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.6; a suite: each benchmark's own)")
    p.add_argument("--top-p", type=float, default=None, help="default 0.95 (a suite: each benchmark's own)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    add_engine_arguments(p, "model")
    p.add_argument("--grader", default=None, help="how answers are graded: math (default), exact, regex or code")
    p.add_argument("--answer-pattern", help="regex grader: a pattern whose first group is the answer, e.g. '#(-?\\d+)'")
    p.add_argument("--ignore-case", action="store_true", help="exact / regex graders: compare case-insensitively")
    p.add_argument(
        "--thinking", action=argparse.BooleanOptionalAction, default=None, help="the chat template's thinking switch (default: template default)"
    )
    p.add_argument("--prompt-template", default=None, help="user message for plain-text problems, with {problem}; 'math' = the step-by-step \\boxed{} instruction")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--shard", default="0/1", help="I/N: evaluate problems I, I+N, ... (0-based); the last shard to finish merges")
    p.add_argument("--batch-samples", type=int, default=None,
                   help="samples per generate call, committed to --out as each finishes: what a crash can lose (default 4096)")
    p.add_argument("--code-workers", type=int, default=None,
                   help="code grader: programs run side by side (default: one per CPU this process may use, at most 8; no effect on results)")
    p.add_argument("--sandbox-allow-unisolated", action="store_true", default=None,
                   help="code grader on a machine without unprivileged user namespaces: run model-written programs WITHOUT "
                        "isolation (they can use the network and read your files); docs/evaluation.md")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out (by default a rerun resumes, and other settings are refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.evaluation import merge_shards
    from megatron_lopd.generation.backends import resolve_dtype
    from megatron_lopd.runtime.shards import parse_shard

    if args.merge:
        summary = merge_shards(args.merge)
        print(summary.console_line(f"eval {args.merge}"), flush=True)
        return 0
    what = ("--suite", args.suite) if args.suite else ("--data", args.data)
    missing = [flag for flag, value in (("--model", args.model), what, ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}", "pass --model HF_DIR --data FILE --out DIR, or --suite NAME --suite-data NAME=PATH, or --merge DIR")
    knobs = {field: getattr(args, dest) for dest, field in _SUITE_KNOBS.items() if getattr(args, dest) is not None}
    knobs["dtype"] = resolve_dtype(args.dtype)
    if args.suite:
        return _suite(args, knobs, parse_shard(args.shard))
    if args.suite_data:
        raise ConfigError("--suite-data without --suite", "name the suite (--suite paper), or pass one data file with --data")
    return _single(args, knobs, parse_shard(args.shard))


def _single(args, knobs: dict, shard) -> int:
    from megatron_lopd.cli import data_source, prompt_template
    from megatron_lopd.evaluation import EvalConfig, run_eval

    config = EvalConfig(**knobs, **{k: v for k, v in dict(grader=args.grader, answer_pattern=args.answer_pattern, ignore_case=args.ignore_case,
                                                          prompt_template=prompt_template(args.prompt_template)).items() if v is not None})
    config.validate()  # before reading anything: K < 1 fails fast
    summary = run_eval(args.model, data_source(args, args.data, "problems"), args.out, config=config, shard=shard,
                       progress=not args.no_progress, overwrite=args.overwrite)
    label = f"eval {args.out}" if summary.shard is None else f"eval {args.out} shard {args.shard} (merged when all finish)"
    print(summary.console_line(label), flush=True)
    return 0


def _suite(args, knobs: dict, shard) -> int:
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.evaluation.suite import SUITE_MD, run_suite, suite_run

    given = [flag for dest, flag in _PER_BENCHMARK.items() if getattr(args, dest) is not None] + (["--ignore-case"] if args.ignore_case else [])
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be used with --suite: each benchmark has its own data format, grader and prompt",
                          "drop them, give a benchmark's data format as --suite-data NAME:FORMAT=PATH, or write a suite file")
    run = suite_run(args.suite, args.suite_data, knobs)
    report = run_suite(args.model, run, args.out, shard=shard, progress=not args.no_progress, overwrite=args.overwrite)
    for line in report.console_lines():
        print(f"suite {report.suite}: {line}", flush=True)
    print(f"suite {report.suite}: table in {args.out}/{SUITE_MD}", flush=True)
    return 1 if report.failed() else 0
