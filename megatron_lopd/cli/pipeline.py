"""`lopd pipeline run|status|plan|check-train|check-score`: the consistent-teacher pipeline (megatron_lopd.pipeline)."""

from __future__ import annotations

import argparse

GPU_MEMORY_GIB = 79.2  # what CUDA reports for an "80 GB" H100


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run the whole pipeline (or some stages), show its status")
    sub = parser.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    run = sub.add_parser("run", help="run stages in order as subprocesses; finished stages are skipped")
    run.add_argument("--config", required=True, help="pipeline config file (.json, .toml, .yaml)")
    run.add_argument("--stages", default="all", help="comma-separated stage names, or 'all' (default)")
    run.add_argument("--log-dir", default=None, help="write each stage's output to LOG_DIR/<stage>.log")
    run.add_argument(
        "--rerun-stale", action="store_true",
        help="a finished output made from other inputs or settings than the config asks (see `status`) is moved to "
             "<dir>.stale-<time> and made again, with every stage downstream of it (default: refuse)")
    run.add_argument("overrides", nargs="*", help="section.key=value, e.g. trainer.lr=1e-6")
    run.set_defaults(handler=_run)

    status = sub.add_parser(
        "status", help="which stages are done (output verifies and matches the config), stale (what differs) or pending; exit 3 unless all done")
    status.add_argument("--config", required=True)
    status.add_argument("overrides", nargs="*")
    status.set_defaults(handler=_status)

    plan = sub.add_parser("plan", help="GPU memory per stage (engines x TP, weights, KV cache, training state); exit 2 if a stage cannot fit")
    plan.add_argument("--config", required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of each node (default 8)")
    plan.add_argument("--gpu-memory-gib", type=float, default=GPU_MEMORY_GIB,
                      help=f"memory of each GPU as CUDA reports it (default {GPU_MEMORY_GIB}: an 80 GB H100; H200: 139.8)")
    plan.add_argument("overrides", nargs="*")
    plan.set_defaults(handler=_plan)

    check = sub.add_parser(
        "check-train",
        help="validate a training job's inputs (config, store, start checkpoint, teacher consistency) without training",
    )
    check.add_argument("--config", required=True, help="trainer config: a preset name or a file, as for `lopd train`")
    check.add_argument("--world-size", type=int, default=None, help="ranks the job will start (checks the parallel layout)")
    check.add_argument("overrides", nargs="*", help="trainer key=value overrides, as for `lopd train`")
    check.set_defaults(handler=_check_train)

    score = sub.add_parser("check-score", help="validate a scoring job's inputs (rollouts, teacher, teacher consistency)")
    score.add_argument("--rollouts", required=True)
    score.add_argument("--teacher", required=True)
    score.add_argument("--sft-data", default=None, help="the SFT data: its generator must be this teacher")
    score.set_defaults(handler=_check_score)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_lopd.pipeline import PipelineConfig, run_local

    config = PipelineConfig.load(args.config, args.overrides)
    run_local(config, args.stages, log_dir=Path(args.log_dir) if args.log_dir else None, rerun_stale=args.rerun_stale)
    return 0


def _status(args: argparse.Namespace) -> int:
    from megatron_lopd.pipeline import PipelineConfig, format_results, status

    results = status(PipelineConfig.load(args.config, args.overrides))
    print(format_results(results))
    return 0 if all(r.status == "done" for r in results) else 3


def _plan(args: argparse.Namespace) -> int:
    from megatron_lopd.pipeline import PipelineConfig
    from megatron_lopd.pipeline.memory import check_plans, format_plan, pipeline_plans

    plans = pipeline_plans(PipelineConfig.load(args.config, args.overrides), args.gpus_per_node, args.gpu_memory_gib)
    print("\n".join(format_plan(plans)))
    check_plans(plans)
    return 0


def _check_train(args: argparse.Namespace) -> int:
    from megatron_lopd.pipeline import check_training_inputs

    for line in check_training_inputs(args.config, args.overrides, args.world_size):
        print(line)
    return 0


def _check_score(args: argparse.Namespace) -> int:
    from megatron_lopd.generation.score import check_scoring_inputs

    for line in check_scoring_inputs(args.rollouts, args.teacher, args.sft_data):
        print(line)
    return 0
