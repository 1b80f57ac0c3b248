"""`lopd`: one console entry, one subcommand per stage.

Each subcommand lives in its own module under `megatron_lopd.cli` and defines
`register(subparsers)`; the handler parses arguments and calls one library function.
Heavy imports (megatron-core, vLLM) happen inside handlers, so `lopd --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_lopd.errors import LopdError

# Subcommand modules, in the order `lopd --help` lists them.
_COMMANDS = ("convert", "store", "data", "generate", "score", "train", "eval", "pipeline", "demo")


def add_engine_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """The inference-engine options `generate`, `score` and `eval` share; ``role`` names the model in the help."""
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm", help=f"{role} engine (default vllm)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help=f"{role} dtype (default auto: bfloat16 on a CUDA GPU, float32 on CPU)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size (GPUs per worker)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="engine context length (default: what the work needs, e.g. longest prompt + --max-tokens, up to the model's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vLLM: fraction of each GPU's memory the engine may use (default vLLM's, 0.9)")


def engine_options(args: argparse.Namespace) -> dict:
    """Backend options from `add_engine_arguments`'s flags that only some engines take."""
    return {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}


def add_data_arguments(parser: argparse.ArgumentParser, *, default_format: str, answers: bool) -> None:
    """How `generate` and `eval` read their data file: a named format and the keys that override its fields."""
    parser.add_argument("--format", default=None, metavar="NAME",
                        help=f"data format: {default_format} (default), or a published layout, e.g. dapo_math_17k, openthoughts3, "
                             "aime24, aime25, hmmt25, lcb_v5 (`lopd data formats` lists them)")
    parser.add_argument("--id-key", default=None, help="field holding the id (dotted for nested fields; default: `id`, else the row number)")
    parser.add_argument("--prompt-key", default=None, help="field holding the prompt: a string or a chat list")
    parser.add_argument("--messages-key", default=None, help="field holding a chat list used as it is ('none': no such field)")
    if answers:
        parser.add_argument("--answer-key", default=None, help="field holding the reference answer, e.g. reward_model.ground_truth")
    parser.add_argument("--lcb-window", default=None, metavar="START:END",
                        help="LiveCodeBench formats: the contest-date window, e.g. 2024-08-01:2025-02-01 (both ends included)")


def prompt_template(text: str | None) -> str | None:
    """`--prompt-template`: a template with {problem}, or 'math' (the step-by-step \\boxed{} instruction)."""
    from megatron_lopd.evaluation.evaluate import MATH_PROMPT_TEMPLATE

    return MATH_PROMPT_TEMPLATE if text == "math" else text


def data_source(args: argparse.Namespace, path: str, default_format: str, prompt_template: str | None = None):
    """The DataSource `add_data_arguments`' flags describe for `path`."""
    from megatron_lopd.datasets import DataSource, data_format

    fmt = data_format(args.format or default_format, id_key=args.id_key, prompt_key=args.prompt_key, messages_key=args.messages_key,
                      answer_key=getattr(args, "answer_key", None), lcb_window=args.lcb_window)
    return DataSource(path, fmt, prompt_template)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print component versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from megatron_lopd.runtime.versions import versions

        for name, version in versions().items():
            print(f"{name:<20} {version}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lopd", description="Lightning OPD: offline on-policy distillation on megatron-core."
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"megatron_lopd.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"megatron_lopd.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        rc = args.handler(args)
    except LopdError as exc:
        if not exc.all_ranks or rank == "0":
            print(f"lopd {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:  # a full disk, a read-only or missing path, a file where a directory belongs
        if os.environ.get("LOPD_TRACEBACK"):
            raise
        from megatron_lopd.runtime.files import os_error_line

        where = "" if rank == "0" else f" (rank {rank})"
        line = os_error_line(exc, getattr(args, "out", None))
        print(f"lopd {args.command}: error{where}: {line} (LOPD_TRACEBACK=1 shows where)", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"lopd {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def run_tool(command: str) -> None:
    """Entry for the thin scripts in tools/: `python tools/x.py ARGS` == `lopd COMMAND ARGS`."""
    sys.exit(main([*command.split(), *sys.argv[1:]]))
