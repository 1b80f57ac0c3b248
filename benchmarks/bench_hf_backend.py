"""The transformers backend at a real width: generation tokens/s and scoring's peak memory, against a baseline.

    git show a5f66f6:megatron_lopd/generation/hf_backend.py > /tmp/old_hf_backend.py  # before issue #18 item 7
    python benchmarks/bench_hf_backend.py [--baseline /tmp/old_hf_backend.py] [--parts generate,score]
                                          [--prompts 16] [--max-tokens 64] [--rounds 1] [--score-tokens 4096]
                                          [--threads 1] [--out results.json]

The model is a random Qwen3 with Qwen3-0.6B's widths (hidden 1024, 16 query / 8 KV heads of 128,
MLP 3072, vocabulary 151,936, tied embeddings) and 2 layers, float32, built locally. The baseline is
another version of `megatron_lopd/generation/hf_backend.py` (a file, imported under its own name), run
on the same model and inputs; without it only the current backend is measured. The defaults take about
7 minutes on one CPU thread.

- ``generate``: rollout-like sampling (temperature 0.7, top-p 0.9, one sample per prompt, the paper's
  setting) of `--max-tokens` tokens for `--prompts` prompts of mixed lengths (64-400 tokens, log-uniform:
  chat-formatted math problems), and for as many prompts of one length (their median), the case the
  baseline batched. Tokens/s in wall time and per CPU-second of this process (steadier on a shared
  machine), the median over rounds after a warm-up; and how many samples the versions agree on
  (same seeds: equal up to float32 noise, which can move an inverse-CDF draw across a token boundary).
- ``score``: one scoring batch of `--score-tokens` response tokens (4 sequences, 128-token prompts), top-k 16;
  each version in a fresh process, after a short warm-up score: the peak resident memory during `score` above
  the memory before (Linux: the peak is reset through /proc/self/clear_refs), next to the size of the
  [positions, vocab] log-softmax buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

QWEN3_0_6B_WIDTHS = dict(vocab_size=151936, hidden_size=1024, num_heads=16, num_kv_heads=8, head_dim=128,
                         intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=40960)


def backend_class(path: Path | None):
    """`HfBackend` of the hf_backend.py at `path` (imported under its own name), or of the library."""
    if path is None:
        from megatron_lopd.generation.hf_backend import HfBackend

        return HfBackend
    spec = importlib.util.spec_from_file_location("baseline_hf_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HfBackend


def _rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_rss_gib(fn) -> float:
    """Peak resident memory while `fn` runs, above the resident memory before it, in GiB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current VmRSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 2**20


def bench_generate(backend, prompts, params, rounds: int) -> dict:
    backend.generate(prompts[:1], dataclasses.replace(params, max_tokens=2))  # warm-up
    rates, cpu_rates = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        samples = backend.generate(prompts, params)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        tokens = sum(len(s.response_ids) for per_prompt in samples for s in per_prompt)
        rates.append(tokens / wall)
        cpu_rates.append(tokens / cpu)
    return {"tokens": tokens, "tok_s": round(statistics.median(rates), 1), "tok_cpu_s": round(statistics.median(cpu_rates), 1),
            "responses": [s.response_ids for per_prompt in samples for s in per_prompt]}


def bench_score(path: Path | None, model_dir: Path, prompts, responses, threads: int) -> dict:
    """In a fresh process (run through `spawn`), so that no other version's heap is reused: a short
    warm-up score, then the peak memory of scoring `responses`."""
    from megatron_lopd.generation.base import inspect_model_dir

    torch.set_num_threads(threads)
    info = inspect_model_dir(model_dir)
    backend = backend_class(path)(info, dtype="float32", device="cpu")
    backend.score(prompts[:1], [responses[0][:16]], top_k=16)
    started = time.perf_counter()
    peak = peak_rss_gib(lambda: backend.score(prompts, responses, top_k=16))
    rows = getattr(backend, "logsoftmax_rows", None) or min(getattr(backend, "logits_chunk", 0), sum(map(len, responses)))
    return {"peak_gib": round(peak, 2), "seconds": round(time.perf_counter() - started, 1), "logsoftmax_rows": rows,
            "logsoftmax_buffers_gib": round(rows * info.vocab_size * 8 / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=None, help="another hf_backend.py to compare against")
    ap.add_argument("--parts", default="generate,score")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--score-tokens", type=int, default=4096, help="response tokens in the scoring batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")

    from megatron_lopd.generation.base import SamplingParams, inspect_model_dir
    from megatron_lopd.models.tiny import write_random_hf_model

    scratch = tempfile.TemporaryDirectory(prefix="bench_hf_backend_")
    model_dir = write_random_hf_model(Path(scratch.name) / "model", seed=args.seed, num_layers=2, init_std=0.02,
                                      **QWEN3_0_6B_WIDTHS)
    info = inspect_model_dir(model_dir)
    versions = {"current": None} | ({"baseline": args.baseline} if args.baseline else {})

    rng = np.random.default_rng(args.seed)
    lengths = np.exp(rng.uniform(np.log(64), np.log(400), size=args.prompts)).astype(int)
    workloads = {
        "mixed lengths": [rng.integers(100, info.vocab_size, size=n).tolist() for n in lengths],
        "equal lengths": [rng.integers(100, info.vocab_size, size=int(np.median(lengths))).tolist() for _ in lengths],
    }
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=args.max_tokens, seed=args.seed)
    per_sequence = args.score_tokens // 4
    score_prompts = [rng.integers(100, info.vocab_size, size=128).tolist() for _ in range(4)]
    score_responses = [rng.integers(100, info.vocab_size, size=per_sequence).tolist() for _ in range(4)]

    results = {"shape": "Qwen3-0.6B widths, 2 layers, float32", "threads": args.threads,
               "prompt_lengths": sorted(lengths.tolist()), "max_tokens": args.max_tokens,
               "score_tokens": 4 * per_sequence, "versions": {}}
    for name, path in versions.items():
        result = results["versions"][name] = {}
        if "generate" in parts:
            backend = backend_class(path)(info, dtype="float32", device="cpu")
            for workload, prompts in workloads.items():
                r = result[f"generate, {workload}"] = bench_generate(backend, prompts, params, args.rounds)
                print(f"{name:<9} generate, {workload:<13} {r['tok_s']:>7.1f} tok/s {r['tok_cpu_s']:>7.1f} tok/cpu-s",
                      file=sys.stderr, flush=True)
            backend.close()
        if "score" in parts:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                r = result["score"] = pool.submit(bench_score, path, model_dir, score_prompts, score_responses,
                                                  args.threads).result()
            print(f"{name:<9} score peak +{r['peak_gib']:.2f} GiB (log-softmax {r['logsoftmax_rows']} rows: "
                  f"{r['logsoftmax_buffers_gib']} GiB)", file=sys.stderr, flush=True)
    if args.baseline and "generate" in parts:
        current, baseline = results["versions"]["current"], results["versions"]["baseline"]
        for key in (k for k in current if k.startswith("generate")):
            same = sum(a == b for a, b in zip(current[key]["responses"], baseline[key]["responses"]))
            current[key]["cpu_speedup"] = round(current[key]["tok_cpu_s"] / baseline[key]["tok_cpu_s"], 2)
            current[key]["same_samples_as_baseline"] = f"{same}/{args.prompts}"
    for version in results["versions"].values():
        for key in (k for k in version if k.startswith("generate")):
            del version[key]["responses"]
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    scratch.cleanup()


if __name__ == "__main__":
    main()
