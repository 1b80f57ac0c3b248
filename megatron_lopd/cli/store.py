"""`lopd store`: inspect, verify and finalize teacher stores.

    lopd store inspect PATH [--json]   sequences, tokens, k, bytes/token, provenance, complete;
                                       exit 1 if a done marker, shard directory or file is missing
    lopd store check PATH              fast: markers, files, sizes, crc32c of every chunk
                                       (no decoding); exit 0 only if all good
    lopd store verify PATH [--json]    reads every shard; exit 0 only if every check passes,
                                       otherwise prints the first problem and exits 1
    lopd store finalize PATH           after all scoring workers exited: check, consolidate,
                                       mark complete
    lopd store consistency PATH        how far the store's teacher is from the SFT model R
                                       (d = lpT - lpR) and how much of it is recurring style
    lopd store residualize PATH --out PATH2
                                       a new store with the style part subtracted (cross-teacher
                                       Lightning OPD, after Lightning OPD 2.0); PATH is kept
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
    p.add_argument("--consistency", action="store_true", help="also measure the teacher-R gap (reads every token; see `consistency`)")
    _style_arguments(p)
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
    p = sub.add_parser("consistency", help="the teacher-R gap d = lpT - lpR: distribution, recurring style share, top tokens")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _style_arguments(p)
    p.add_argument("--top", type=int, default=10, help="tokens with the largest recurring gap to list (default 10)")
    p.set_defaults(handler=_consistency)
    p = sub.add_parser("residualize", help="write a copy of the store with the teachers' style difference subtracted")
    p.add_argument("path")
    p.add_argument("--out", required=True, help="the corrected store (a new path; the original is never modified)")
    _style_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing corrected store at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_residualize)


def _style_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_lopd.store.style import StyleConfig

    d = StyleConfig()
    p.add_argument("--folds", type=int, default=d.folds, help=f"cross-fitting folds, dealt by rollout (default {d.folds})")
    p.add_argument("--position-bins", type=int, default=d.position_bins, help=f"response-position bins (default {d.position_bins})")
    p.add_argument("--surprisal-bins", type=int, default=d.surprisal_bins,
                   help=f"R-surprisal (-lpR) bins at the store's quantiles (default {d.surprisal_bins})")
    p.add_argument("--min-count", type=int, default=d.min_count,
                   help=f"rollouts a table cell needs, else it takes the global mean (default {d.min_count})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the fold assignment (default 0)")
    p.add_argument("--tokenizer", help="model dir whose tokenizer decodes the listed tokens")


def _style_config(args: argparse.Namespace):
    from megatron_lopd.store.style import StyleConfig

    return StyleConfig(folds=args.folds, position_bins=args.position_bins, surprisal_bins=args.surprisal_bins,
                       min_count=args.min_count, seed=args.seed)


def _tokenizer(args: argparse.Namespace):
    if not args.tokenizer:
        return None
    from megatron_lopd.generation.prompts import load_tokenizer

    return load_tokenizer(args.tokenizer)


def _consistency(args: argparse.Namespace) -> int:
    from megatron_lopd.store.style import consistency_report

    report = consistency_report(args.path, _style_config(args), tokenizer=_tokenizer(args), top=args.top, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else "\n".join(report.lines()))
    return 0


def _residualize(args: argparse.Namespace) -> int:
    from megatron_lopd.store.style import residualize_store

    r = residualize_store(args.path, args.out, _style_config(args), overwrite=args.overwrite, progress=not args.no_progress,
                          tokenizer=_tokenizer(args))
    print("\n".join(r.report.lines()[:-1]))
    topk = "" if r.topk_kl is None else (f"; top-k: token table applied and renormalised, KL from the original "
                                         f"{r.topk_kl:.4f} nats/position, top-1 changed at {100 * r.topk_top1_changed:.1f} % of positions")
    print(f"wrote {r.out} in {r.seconds:.1f} s: corrected sampled-token scores (above 0 at {100 * r.positive_scores:.1f} % of tokens){topk}; "
          f"provenance names the parent {r.parent_fingerprint} and every parameter")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from megatron_lopd.store import inspect_store

    summary = inspect_store(args.path)
    report = None
    if args.consistency and not summary.problems:
        from megatron_lopd.store.style import consistency_report

        report = consistency_report(args.path, _style_config(args), tokenizer=_tokenizer(args))
    if args.json:
        print(json.dumps({**summary.to_dict(), **({"consistency": report.to_dict()} if report else {})}, indent=2, sort_keys=True))
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
    print(f"teacher signal {summary.teacher_signal}")
    print(f"bytes          {summary.nbytes} ({summary.bytes_per_token:.1f} B/response token)")
    for key in ("teacher_fingerprint", "tokenizer_fingerprint", "rollouts_fingerprint",
                "rollout_generator_fingerprint", "engine", "engine_version", "code_version", "created_at"):
        print(f"{key:<30} {prov.get(key)}")
    if prov.get("extra"):
        print(f"{'extra':<30} {json.dumps(prov['extra'], sort_keys=True)}")
    if report is not None:
        print("\n".join(report.lines()))
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
