"""`lopd convert`: Hugging Face <-> Megatron checkpoints of Qwen3 / Qwen3-MoE models."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert Qwen3 checkpoints between Hugging Face and Megatron")
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    from_hf = directions.add_parser(
        "from-hf", help="HF model dir -> Megatron dist checkpoint",
        description="Stream a Hugging Face Qwen3 dir into a Megatron dist checkpoint (loadable at any TP/PP/EP; "
        "--tp/--ep choose the saved layout and are checked against the model).",
    )
    from_hf.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + safetensors)")
    from_hf.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    from_hf.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1, MoE only)")
    from_hf.set_defaults(handler=_from_hf)

    to_hf = directions.add_parser(
        "to-hf", help="Megatron checkpoint -> HF model dir",
        description="Write a Megatron checkpoint (any TP/PP/EP, read from the checkpoint) as a Hugging Face dir.",
    )
    to_hf.add_argument("--checkpoint", required=True, help="Megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new HF model directory (must not exist or be empty)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    to_hf.set_defaults(handler=_to_hf)


def _from_hf(args: argparse.Namespace) -> int:
    from megatron_lopd.models.checkpoint import convert_from_hf

    start = time.perf_counter()
    out = convert_from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep)
    print(f"wrote Megatron checkpoint {out} (TP={args.tp} PP={args.pp} EP={args.ep}) in {time.perf_counter() - start:.1f} s")
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from megatron_lopd.models.checkpoint import convert_to_hf

    start = time.perf_counter()
    out = convert_to_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size)
    print(f"wrote Hugging Face model {out} in {time.perf_counter() - start:.1f} s")
    return 0
