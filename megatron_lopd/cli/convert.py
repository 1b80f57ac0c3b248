"""`lopd convert`: Hugging Face <-> Megatron checkpoints of Qwen3 / Qwen3-MoE models."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


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
    to_hf.add_argument("--checkpoint", required=True,
                       help="Megatron checkpoint directory, or a training run directory (its newest checkpoint, and "
                            "the export gets a manifest.json with the run's provenance)")
    to_hf.add_argument("--out", required=True, help="new HF model directory (must not exist or be empty)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    to_hf.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                       help="tensor dtype, also written to config.json (default: the dtype the model's config names)")
    to_hf.set_defaults(handler=_to_hf)


def _from_hf(args: argparse.Namespace) -> int:
    from megatron_lopd.models.checkpoint import convert_from_hf

    start = time.perf_counter()
    out = convert_from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep)
    print(f"wrote Megatron checkpoint {out} (TP={args.tp} PP={args.pp} EP={args.ep}) in {time.perf_counter() - start:.1f} s")
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from megatron_lopd.models.checkpoint import convert_to_hf
    from megatron_lopd.provenance import MANIFEST_NAME, write_hf_manifest
    from megatron_lopd.training.checkpointing import find_latest

    start = time.perf_counter()
    run_dir = Path(args.checkpoint)
    checkpoint = find_latest(run_dir / "checkpoints")  # the trainer's layout: RUN/checkpoints/latest
    if checkpoint is None:
        run_dir, checkpoint = None, find_latest(args.checkpoint) or Path(args.checkpoint)
    out = convert_to_hf(checkpoint, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    if run_dir is not None and (run_dir / MANIFEST_NAME).is_file():
        write_hf_manifest(out, run_dir, checkpoint)
    print(f"wrote Hugging Face model {out} from {checkpoint} in {time.perf_counter() - start:.1f} s")
    return 0
