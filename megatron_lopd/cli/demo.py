"""`lopd demo --out DIR [--seed S | --seeds 0,1,2] [--study paper-loss] [--overwrite | --resume] [--jobs N]`: the whole pipeline in miniature on CPU.

Trains two tiny teachers and a student, runs the consistent-teacher pipeline with the
real stages (SFT data, SFT, rollouts, scoring into the store, Lightning OPD, export,
evaluation), the teacher-consistency and online-OPD comparisons from the same R, and
writes DIR/report.md, DIR/curves.png and DIR/summary.json. Independent stages run at
once in --jobs lanes (about 6 minutes on 2 cores). `--study paper-loss` adds the study
of the paper's loss (OUT/study-paper-loss/study.md).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the tiny end-to-end Lightning OPD demo on CPU and write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (report.md, curves.png, summary.json, work/)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0,
                       help="seed of the student side: R's initialisation, every sample and data order (default 0); "
                            "the teachers are given models, the same for every seed")
    seeds.add_argument("--seeds", default=None, metavar="S1,S2,...",
                       help="run once per seed into OUT/seed-N/ and write OUT/aggregate.md: mean +- sd over seeds (README: 0,1,2)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="delete an existing demo in --out and start over")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted demo from its last finished stage")
    p.add_argument("--comparison-losses", default="topk_reverse_kl",
                   help="comma-separated losses of the teacher-B runs, plain and style-residualized (default topk_reverse_kl; "
                        "add lightning_opd for the paper's loss, one more run of each)")
    p.add_argument("--online-losses", default="lightning_opd,topk_reverse_kl",
                   help="comma-separated losses of the standard online OPD runs (default both: the paper's loss and top-k reverse KL, "
                        "each against Lightning OPD with the same loss)")
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run at once, one process and one thread each (default: one per usable CPU, at most 4); "
                        "the numbers do not depend on it")
    p.add_argument("--study", choices=["paper-loss"], default=None,
                   help="after the demo (run or resumed in --out), the paper-loss study: lr, passes, advantage clip and "
                        "T=0.7 data, one at a time, into OUT/study-paper-loss/ (about 6 min more on 2 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    import dataclasses

    from megatron_lopd.demo.run import LOSS_LABELS, DemoSizes, run_demo, run_demo_seeds
    from megatron_lopd.errors import ConfigError

    def losses(flag: str, value: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
        unknown = [x for x in names if x not in LOSS_LABELS or x == "sft"]
        if unknown or not names:
            raise ConfigError(f"{flag} {value!r}: unknown {', '.join(unknown) or 'empty list'}",
                              f"use some of {', '.join(k for k in LOSS_LABELS if k != 'sft')}")
        return names

    sizes = dataclasses.replace(DemoSizes(), comparison_losses=losses("--comparison-losses", args.comparison_losses),
                                online_losses=losses("--online-losses", args.online_losses))
    if args.study and args.seeds is not None:
        raise ConfigError("--study runs over one demo", "pass --seed S (one seed) with --study, not --seeds")
    if args.study == "paper-loss":
        from megatron_lopd.demo.study import run_paper_loss_study

        run_paper_loss_study(args.out, seed=args.seed, sizes=sizes, jobs=args.jobs, overwrite=args.overwrite, progress=not args.no_progress)
        return 0
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r} is not a list of integers", "e.g. --seeds 0,1,2") from None
        run_demo_seeds(args.out, seeds, sizes=sizes, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
                       jobs=args.jobs)
        return 0
    run_demo(args.out, seed=args.seed, sizes=sizes, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
             jobs=args.jobs)
    return 0
