"""`lopd data`: the data formats, and the leakage / duplicate check of training prompts against evaluation sets.

    lopd data formats
    lopd data check --opd-prompts dapo-math-17k.jsonl --format dapo_math_17k_slime \\
        --eval aime24=aime_2024.parquet --eval aime25=AIME2025/ --eval hmmt25=hmmt_feb_2025.parquet \\
        --eval lcb_v5=lcb/ --eval my_set:problems=mine.jsonl

`check` prints the prompts each file repeats and every evaluation problem that occurs in a
training prompt (identical, or contained in it, after normalising case and whitespace). It exits
1 when an evaluation problem leaks into the training prompts (with --strict also when a file
repeats prompts), 0 otherwise; --json FILE writes the full report.
"""

from __future__ import annotations

import argparse

from megatron_lopd.cli import add_data_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data formats; leakage and duplicate check of training prompts vs evaluation sets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    formats = sub.add_parser("formats", help="list the data formats (--format NAME) and the layouts they read")
    formats.set_defaults(handler=_formats)
    check = sub.add_parser("check", help="repeated prompts, and evaluation problems found in the training prompts",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--opd-prompts", required=True, metavar="PATH", help="the training prompts (OPD or SFT prompts): a file or directory")
    add_data_arguments(check, default_format="prompts", answers=False)
    check.add_argument("--eval", action="append", default=[], required=True, metavar="NAME[:FORMAT]=PATH",
                       help="an evaluation set (repeat); FORMAT defaults to NAME (aime24, aime25, hmmt25, lcb_v5, lcb_v6, problems, ...)")
    check.add_argument("--strict", action="store_true", help="also exit 1 when a file repeats prompts")
    check.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    check.set_defaults(handler=_check)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def _formats(args) -> int:
    from megatron_lopd.datasets import FORMATS

    width = max(map(len, FORMATS))
    for name, fmt in FORMATS.items():
        print(f"{name:<{width}}  {fmt.source}")
    return 0


def _check(args) -> int:
    import json
    from pathlib import Path

    from megatron_lopd.cli import data_source
    from megatron_lopd.datasets import check_leakage, named_source
    from megatron_lopd.errors import ConfigError

    evals = {}
    for item in args.eval:
        name, source = named_source(item, "--eval")
        if name in evals:
            raise ConfigError(f"--eval names {name!r} twice", "give every evaluation set its own name")
        evals[name] = source
    report = check_leakage(data_source(args, args.opd_prompts, "prompts"), evals)
    for line in report.lines():
        print(line, flush=True)
    if args.json:
        from megatron_lopd.runtime.files import atomic_write

        atomic_write(Path(args.json), json.dumps(report.to_dict(), indent=2) + "\n")
    repeats = any(report.duplicate_rows(f) for f in [report.prompts, *report.eval_rows])
    return 1 if report.leaked or (args.strict and repeats) else 0
