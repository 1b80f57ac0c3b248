"""`lopd store`: inspect, verify and finalize teacher stores.

    lopd store inspect PATH [--json]   sequences, tokens, k, bytes/token, provenance, complete;
                                       exit 1 if a done marker, shard directory or file is missing
    lopd store check PATH              fast: markers, files, sizes, crc32c of every chunk
                                       (no decoding); exit 0 only if all good
    lopd store verify PATH [--json]    reads every shard; exit 0 only if every check passes,
                                       otherwise prints the first problem and exits 1
    lopd store finalize PATH           after all scoring workers exited: check, consolidate,
                                       mark complete
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("store", help="inspect, verify or finalize a teacher store")
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="summary: sequences, tokens, k, bytes/token, provenance, complete")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_inspect)
    p = sub.add_parser("check", help="fast: markers, files, sizes and the crc32c of every chunk (no decoding)")
    p.add_argument("path")
    p.add_argument("--no-checksums", action="store_true", help="markers, files and sizes only")
    p.set_defaults(handler=_check)
    p = sub.add_parser("verify", help="read every shard and check markers and checksums (exit 0 only if all good)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(handler=_verify)
    p = sub.add_parser("finalize", help="check every shard, consolidate metadata, mark the store complete")
    p.add_argument("path")
    p.add_argument("--no-verify", action="store_true", help="skip reading every chunk before marking complete")
    p.set_defaults(handler=_finalize)


def _inspect(args: argparse.Namespace) -> int:
    from megatron_lopd.store import inspect_store

    summary = inspect_store(args.path)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return 1 if summary.problems else 0
    prov = summary.provenance
    print(f"teacher store  {summary.path}")
    if summary.problems:
        shown = "; ".join(summary.problems[:3]) + (f" (+{len(summary.problems) - 3} more)" if len(summary.problems) > 3 else "")
        print(f"complete       no: DAMAGED ({summary.shards_done}/{summary.num_shards} shards present): {shown} "
              "(fix: delete the named shards' markers and rerun `lopd score` on this store, or rescore with --overwrite)")
    else:
        print(f"complete       {'yes' if summary.complete else 'no'} ({summary.shards_done}/{summary.num_shards} shards done)")
    print(f"schema         v{summary.schema_version}")
    print(f"sequences      {summary.num_sequences}")
    print(f"tokens         {summary.response_tokens} response, {summary.prompt_tokens} prompt")
    print(f"top-k          {summary.top_k} (vocab {summary.vocab_size}); rollout log-probs: "
          f"{'yes' if summary.has_rollout_logprobs else 'no'}")
    print(f"bytes          {summary.nbytes} ({summary.bytes_per_token:.1f} B/response token)")
    for key in ("teacher_fingerprint", "tokenizer_fingerprint", "rollouts_fingerprint",
                "rollout_generator_fingerprint", "engine", "engine_version", "code_version", "created_at"):
        print(f"{key:<30} {prov.get(key)}")
    if prov.get("extra"):
        print(f"{'extra':<30} {json.dumps(prov['extra'], sort_keys=True)}")
    return 1 if summary.problems else 0


def _check(args: argparse.Namespace) -> int:
    from megatron_lopd.store import check_store_files

    stats = check_store_files(args.path, checksums=not args.no_checksums)
    print(f"OK {args.path}: {stats.shards} shards, {stats.files} files, {stats.chunks} chunk checksums, "
          f"{stats.bytes_read} bytes read in {stats.seconds:.2f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_lopd.store import verify_store

    report = verify_store(args.path, progress=args.progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    elif report.ok:
        print(f"OK {args.path}: {report.shards_checked} shards, {report.chunks_checked} chunks, "
              f"{report.tokens_checked} tokens checked")
    else:
        print(f"FAILED {args.path}: {report.first_problem}"
              + (f" (+{len(report.problems) - 1} more problems)" if len(report.problems) > 1 else ""))
    return 0 if report.ok else 1


def _finalize(args: argparse.Namespace) -> int:
    from megatron_lopd.store import finalize_store

    summary = finalize_store(args.path, verify=not args.no_verify, progress=True)
    print(f"finalized {summary.path}: {summary.num_sequences} sequences, {summary.response_tokens} tokens, "
          f"{summary.bytes_per_token:.1f} B/token")
    return 0
