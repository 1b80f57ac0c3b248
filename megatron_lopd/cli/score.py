"""`lopd score`: score a rollout artifact with the teacher into a teacher store.

    lopd score --rollouts data/rollouts --teacher TEACHER_HF --out data/store --top-k 16
    lopd score ... --shard 3/8        # worker 3 of 8 (default: from srun / SLURM array / torchrun)
    lopd score --out data/store --finalize          # once, after every worker has exited
"""

from __future__ import annotations

import argparse

from megatron_lopd.cli import add_engine_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="teacher-score rollouts into a teacher store",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollouts", help="rollout artifact directory (from `lopd generate`)")
    p.add_argument("--teacher", help="teacher Hugging Face model directory")
    p.add_argument("--out", required=True, help="teacher store directory (resumed if it exists)")
    p.add_argument("--top-k", type=int, default=16, help="teacher top-k stored at each response position (default 16; 0 = none)")
    add_engine_arguments(p, "teacher")
    p.add_argument("--sequences-per-shard", type=int, default=256, help="store shard size: the unit of work and resume (default 256)")
    p.add_argument("--shard", default=None, metavar="I/N", help="score store shards s with s %% N == I")
    p.add_argument("--finalize", action="store_true", help="only finalize the store (after all workers exited)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing store at --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_lopd.cli import engine_options
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.generation.backends import resolve_dtype
    from megatron_lopd.generation.score import ScoreConfig, score_to_store
    from megatron_lopd.runtime.shards import parse_shard

    if not args.finalize and not (args.rollouts and args.teacher):
        raise ConfigError("--rollouts and --teacher are required (unless --finalize)", "pass both directories")
    cfg = ScoreConfig(
        rollouts=Path(args.rollouts or "."), teacher=Path(args.teacher or "."), out=Path(args.out), top_k=args.top_k,
        backend=args.backend, dtype=resolve_dtype(args.dtype), tensor_parallel=args.tensor_parallel, max_model_len=args.max_model_len,
        backend_options=engine_options(args),
        shard=parse_shard(args.shard), sequences_per_shard=args.sequences_per_shard,
        finalize=True if args.finalize else None, overwrite=args.overwrite, progress=not args.no_progress,
    )
    r = score_to_store(cfg)
    rate = f", {r.tokens_scored / r.seconds:,.0f} tok/s" if r.tokens_scored else ""
    state = "complete" if r.complete else "not finalized yet (run `lopd score --out STORE --finalize` after all workers)"
    skipped = f", {r.shards_skipped} skipped (held by another scorer)" if r.shards_skipped else ""
    print(f"teacher store {r.out}: {r.shards_written} shards scored{skipped} ({r.tokens_scored:,} tokens in {r.seconds:.1f} s{rate}); {state}")
    return 0
