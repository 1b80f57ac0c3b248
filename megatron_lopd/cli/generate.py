"""`lopd generate`: sample responses to a prompt file into a rollout artifact.

    lopd generate --model TEACHER_HF --prompts sft_prompts.jsonl --out data/sft --kind sft_data \
        --temperature 0.7 --top-p 0.9 --max-tokens 16384
    lopd generate --model SFT_HF --prompts dapo-math-17k.jsonl --format dapo_math_17k_slime --out data/rollouts \
        --record-logprobs --temperature 0.7 --top-p 0.9 --max-tokens 4096 --shard 0/8     # one of 8 workers
"""

from __future__ import annotations

import argparse

from megatron_lopd.cli import add_data_arguments, add_engine_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample responses to a prompt file (SFT data or rollouts)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (the generator)")
    p.add_argument("--prompts", required=True,
                   help="JSONL or parquet (or a directory of them); by default with 'id' and 'prompt' (string or chat) or 'messages' (chat)")
    add_data_arguments(p, default_format="prompts", answers=False)
    p.add_argument("--prompt-template", default=None,
                   help="user message made of a plain-text prompt, with {problem} where it goes; 'math' = the step-by-step \\boxed{} instruction")
    p.add_argument("--out", required=True, help="rollout artifact directory (resumed if it exists)")
    p.add_argument("--kind", choices=("rollouts", "sft_data"), default="rollouts", help="what the artifact is for (default rollouts)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest response; longer ones are cut (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; sample j of prompt i uses a seed derived from (seed, i, j)")
    p.add_argument("--record-logprobs", action="store_true", help="store the generator's raw log-prob of each sampled token (drift monitor)")
    p.add_argument("--thinking", choices=("on", "off"), default=None, help="enable_thinking for the chat template (default: template default)")
    add_engine_arguments(p, "model")
    p.add_argument("--chunk-size", type=int, default=256, help="prompts per chunk: the unit of resume and sharding (default 256)")
    p.add_argument("--shard", default=None, metavar="I/N", help="process chunk c iff c %% N == I (default: from srun / SLURM array / torchrun, else 0/1)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing artifact at --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_lopd.cli import data_source, engine_options, prompt_template
    from megatron_lopd.generation.backends import resolve_dtype
    from megatron_lopd.generation.base import SamplingParams
    from megatron_lopd.generation.generate import GenerateConfig, generate_artifact
    from megatron_lopd.runtime.shards import parse_shard

    cfg = GenerateConfig(
        # A DataSource stands for its path wherever one is expected: the generator reads it in its format.
        model=Path(args.model), prompts=data_source(args, args.prompts, "prompts", prompt_template(args.prompt_template)),
        out=Path(args.out), kind=args.kind,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, n=args.n,
                                seed=args.seed, record_logprobs=args.record_logprobs),
        backend=args.backend, dtype=resolve_dtype(args.dtype), tensor_parallel=args.tensor_parallel, max_model_len=args.max_model_len,
        thinking=None if args.thinking is None else args.thinking == "on", chunk_size=args.chunk_size,
        shard=parse_shard(args.shard), overwrite=args.overwrite, progress=not args.no_progress,
        backend_options=engine_options(args),
    )
    result = generate_artifact(cfg)
    if result.artifact is not None:
        print(f"wrote {result.artifact.kind} artifact {result.out}: {len(result.artifact)} samples, "
              f"fingerprint {result.artifact.fingerprint}")
    else:
        print(f"shard {cfg.shard} done ({result.chunks_written} chunks written); "
              f"{result.chunks_missing} chunks left to other shards")
    return 0
