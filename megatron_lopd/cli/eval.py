"""`lopd eval`: evaluate a Hugging Face model on a JSONL problem set (avg@K, pass@k).

    lopd eval --model HF_DIR --data aime24.jsonl --out runs/eval/aime24 -k 64 --max-tokens 32768
    lopd eval ... --shard 0/4     # one of 4 processes (GPUs, SLURM tasks); the last one merges
    lopd eval --merge runs/eval/aime24   # merge shard outputs explicitly

Samples are committed to DIR/progress/ every --batch-samples samples: rerunning the same
command after a crash resumes there; other settings into the same --out are refused
(--overwrite discards the earlier results).
"""

from __future__ import annotations

import argparse

from megatron_lopd.cli import add_engine_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: K samples per problem, graded, avg@K and pass@k",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="Hugging Face model directory")
    p.add_argument("--data", help="JSONL: one {id, problem | messages, answer} per line")
    p.add_argument("--out", help="output directory (samples.jsonl, summary.json)")
    p.add_argument("--merge", metavar="DIR", help="only merge DIR/shard-*-of-N/ into DIR and print the result")
    p.add_argument("-k", "--samples-per-problem", type=int, default=1, help="K samples per problem (paper: 64)")
    p.add_argument("--max-tokens", type=int, default=32768, help="response token budget (default 32768)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p, "model")
    p.add_argument("--grader", choices=("math", "exact", "regex"), default="math")
    p.add_argument("--answer-pattern", help="regex grader: a pattern whose first group is the answer, e.g. '#(-?\\d+)'")
    p.add_argument("--ignore-case", action="store_true", help="exact / regex graders: compare case-insensitively")
    p.add_argument(
        "--thinking", action=argparse.BooleanOptionalAction, default=None, help="the chat template's thinking switch (default: template default)"
    )
    p.add_argument("--prompt-template", default="{problem}", help="user message for `problem` lines; 'math' = the step-by-step \\boxed{} instruction")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--shard", default="0/1", help="I/N: evaluate problems I, I+N, ... (0-based); the last shard to finish merges")
    p.add_argument("--batch-samples", type=int, default=4096,
                   help="samples per generate call, committed to --out as each finishes: what a crash can lose (default 4096)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --out (by default a rerun resumes, and other settings are refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.evaluation import MATH_PROMPT_TEMPLATE, EvalConfig, merge_shards, run_eval
    from megatron_lopd.generation.backends import resolve_dtype
    from megatron_lopd.runtime.shards import parse_shard

    if args.merge:
        summary = merge_shards(args.merge)
        print(summary.console_line(f"eval {args.merge}"), flush=True)
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}", "pass --model HF_DIR --data FILE.jsonl --out DIR (or --merge DIR)")
    config = EvalConfig(
        samples_per_problem=args.samples_per_problem,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        grader=args.grader,
        answer_pattern=args.answer_pattern,
        ignore_case=args.ignore_case,
        enable_thinking=args.thinking,
        prompt_template=MATH_PROMPT_TEMPLATE if args.prompt_template == "math" else args.prompt_template,
        system_prompt=args.system_prompt,
        backend=args.backend,
        dtype=resolve_dtype(args.dtype),
        tensor_parallel=args.tensor_parallel,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        batch_samples=args.batch_samples,
    )
    summary = run_eval(args.model, args.data, args.out, config=config, shard=parse_shard(args.shard), progress=not args.no_progress,
                       overwrite=args.overwrite)
    label = f"eval {args.out}" if summary.shard is None else f"eval {args.out} shard {args.shard} (merged when all finish)"
    print(summary.console_line(label), flush=True)
    return 0
