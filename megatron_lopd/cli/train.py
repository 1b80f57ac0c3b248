"""`lopd train --config FILE|NAME key=value ...`: SFT or Lightning OPD on megatron-core.

Launch with torchrun / srun for several processes; a plain call is one process.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a student (SFT or Lightning OPD) on megatron-core",
        description=(
            "Train with a named config (lightning_opd, sft, tiny_cpu) or a JSON/YAML/TOML file, "
            "plus dotted key=value overrides, e.g. `lopd train --config lightning_opd "
            "model.start_from=ckpt/R data.store=store data.sft_data=sft run_dir=runs/opd`. "
            "A run resumes from its latest checkpoint when restarted (checkpoint.resume=auto)."
        ),
    )
    parser.add_argument("--config", required=True, help="a config file (.json/.yaml/.toml) or a named config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optimizer.lr=1e-5")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from megatron_lopd.training.config import resolve_config

    config = resolve_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from megatron_lopd.training.loop import train

    train(config)
    return 0
