"""Peak memory of every loss's forward + backward at the real vocabulary, chunked vs all at once.

    python benchmarks/bench_loss_memory.py                    # CPU: 1024 tokens in one row, ~40 s on 2 cores
    python benchmarks/bench_loss_memory.py --repeats 3        # and the time of each pass
    python benchmarks/bench_loss_memory.py --device cuda --tokens 8192 --row-length 4096 --dtype bfloat16
    python benchmarks/bench_loss_memory.py --vocab 37984      # one TP-4 shard of Qwen3's 151,936 columns

What it measures: for every loss in `LOSSES`, `compute_loss` forward + `backward()` on random
logits [B, T, V] (a leaf made before the measurement, as the model's output is), twice in the
same run: with `LossOptions(logit_chunks=1)`, all tokens in one pass (the algorithm before
token chunking, kept as that option), and with the default chunking. The change that
introduced chunking also dropped one float32 temporary per pass (and, for bf16 logits, a
float32 copy): the former code (commit 234b699) held 3.0x (bf16 logits: 4.0x) where one pass now holds
2.25x, so "before" here understates the former code by 0.75x (1.75x). The distilling losses
get what a teacher store with top-k 16 and rollout log-probs gives the trainer (their
metrics are part of the pass); sft gets only its targets. A quarter of each row is prompt.

Memory comes from torch.profiler's allocation events (profile_memory=True): every tensor
allocation and free on the logits' device during the measurement, replayed in order. It
counts the bytes of tensors, as torch.cuda.max_memory_allocated does on GPU (printed there
as a cross-check), not process RSS: torch's CPU allocator keeps no peak counter, and RSS
would add allocator and page-cache effects. Both figures are multiples of the logits' size
in float32 (B x T x V x 4 bytes), whatever --dtype:
- peak: the most bytes held at once by tensors allocated during forward + backward (the
  logits' gradient included; the logits and the batch, allocated before, excluded);
- temporaries: the same without the logits' gradient once it exists: the figure that
  training/vocab_parallel.py bounds (2.25x / logit_chunks, ~0.3x at the default 8).
With --repeats N, also the median wall-clock and process CPU seconds (all threads) of N
more forward + backward passes without the profiler, before and after interleaved so that
load from other processes hits both alike. Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_lopd.training.losses import LOSSES, LossInputs, LossOptions, compute_loss
from megatron_lopd.training.vocab_parallel import LOGIT_CHUNKS

QWEN3_VOCAB = 151_936
TOP_K = 16


def make_batch(args, device: torch.device) -> tuple[torch.Tensor, LossInputs, LossInputs]:
    """(logits, a distilling loss's batch, sft's batch): random, with the trainer's layout."""
    B, T, V = args.tokens // args.row_length, args.row_length, args.vocab
    torch.manual_seed(args.seed)
    logits = (torch.randn(B, T, V, device=device, dtype=torch.float32) * 2).to(args.dtype).requires_grad_()
    mask = (torch.arange(T, device=device) >= T // 4).expand(B, T)
    seq_ids = torch.arange(B, device=device)[:, None].expand(B, T)
    targets = LossInputs(torch.randint(0, V, (B, T), device=device), mask, seq_ids, num_sequences=B)
    teacher = -3 * torch.rand(B, T, device=device)
    topk_logprobs = torch.randn(B, T, TOP_K, device=device).log_softmax(-1) + math.log(0.9)
    store = LossInputs(**{
        **targets.__dict__,
        "teacher_logprobs": teacher,
        "teacher_topk_ids": torch.randint(0, V, (B, T, TOP_K), device=device),
        "teacher_topk_logprobs": topk_logprobs.sort(-1, descending=True).values,
        "rollout_logprobs": teacher + 0.1 * torch.randn(B, T, device=device),
    })
    return logits, store, targets


def replay_peaks(trace_events: list[dict], device_type: int, grad: torch.Tensor) -> tuple[int, int]:
    """(peak bytes, peak bytes without `grad` once allocated) over the profiler's allocation events."""
    events = sorted(
        (e["args"] for e in trace_events if e.get("name") == "[memory]" and e["args"]["Device Type"] == device_type),
        key=lambda a: a["Ev Idx"],
    )
    # The gradient's block: the last allocation at its address (the CUDA allocator may round its size up).
    grad_alloc = max(i for i, a in enumerate(events) if a["Addr"] == grad.data_ptr() and a["Bytes"] > 0)
    grad_bytes = events[grad_alloc]["Bytes"]
    live = peak = peak_temporaries = 0
    for i, a in enumerate(events):
        live += a["Bytes"]
        peak = max(peak, live)
        peak_temporaries = max(peak_temporaries, live - (grad_bytes if i >= grad_alloc else 0))
    return peak, peak_temporaries


def forward_backward(name: str, logits: torch.Tensor, inputs: LossInputs, chunks: int) -> None:
    logits.grad = None
    loss, _ = compute_loss(name, logits, inputs, options=LossOptions(logit_chunks=chunks))
    loss.backward()
    if logits.is_cuda:
        torch.cuda.synchronize()


def measure_memory(name: str, logits: torch.Tensor, inputs: LossInputs, chunks: int) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if logits.is_cuda else [])
    logits.grad = None
    if logits.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=activities, profile_memory=True) as prof:
            forward_backward(name, logits, inputs, chunks)
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        trace_events = json.loads(trace.read_text())["traceEvents"]
    fp32_logits = logits.numel() * 4
    peak, temporaries = replay_peaks(trace_events, 1 if logits.is_cuda else 0, logits.grad)
    row = {"loss": name, "logit_chunks": chunks, "peak": peak / fp32_logits, "temporaries": temporaries / fp32_logits}
    if logits.is_cuda:
        row["cuda_max_allocated"] = (torch.cuda.max_memory_allocated() - before) / fp32_logits
    logits.grad = None
    return row


def time_once(name: str, logits: torch.Tensor, inputs: LossInputs, chunks: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    forward_backward(name, logits, inputs, chunks)
    logits.grad = None
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (B x T)")
    ap.add_argument("--row-length", type=int, default=None, help="T, tokens per row (default: all tokens in one row)")
    ap.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help="logit columns on this rank (V / TP)")
    ap.add_argument("--chunks", type=int, default=LOGIT_CHUNKS, help="logit_chunks of the 'after' column")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=0, help="also time N passes of each (default: memory only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    args.row_length = args.row_length or args.tokens
    if args.tokens % args.row_length:
        ap.error(f"--tokens {args.tokens} is not a multiple of --row-length {args.row_length}")
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    logits, store, targets = make_batch(args, device)
    runs = [(name, store if spec.distills else targets, chunks) for name, spec in LOSSES.items() for chunks in (1, args.chunks)]
    rows = []
    for name, inputs, chunks in runs:
        rows.append(measure_memory(name, logits, inputs, chunks))
        print(f"  memory: {name}, logit_chunks={chunks}", file=sys.stderr, flush=True)
    times = [[] for _ in runs]
    for repeat in range(args.repeats):
        for run_times, (name, inputs, chunks) in zip(times, runs):
            run_times.append(time_once(name, logits, inputs, chunks))
        print(f"  time: repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
    for row, run_times in zip(rows, times):
        if run_times:
            row["wall_s"] = statistics.median(t[0] for t in run_times)
            row["cpu_s"] = statistics.median(t[1] for t in run_times)

    gib = logits.numel() * 4 / 2**30
    print(f"\nlogits [{', '.join(map(str, logits.shape))}] {str(args.dtype).removeprefix('torch.')} on {device}, "
          f"float32 size {gib:.2f} GiB; memory as multiples of that; before: logit_chunks=1, after: {args.chunks}")
    timed = ["wall_s", "cpu_s"] if args.repeats else []
    print(f"{'loss':<16} {'peak before':>11} {'peak after':>10} {'temps before':>12} {'temps after':>11} {'after/before':>12}"
          + "".join(f" {key + ' before':>12} {key + ' after':>11}" for key in timed))
    for before, after in zip(rows[::2], rows[1::2]):
        print(f"{before['loss']:<16} {before['peak']:>11.2f} {after['peak']:>10.2f} {before['temporaries']:>12.2f} "
              f"{after['temporaries']:>11.2f} {after['temporaries'] / before['temporaries']:>12.2f}"
              + "".join(f" {before[key]:>12.2f} {after[key]:>11.2f}" for key in timed))
        if logits.is_cuda:
            print(f"{'':<16} cuda max_memory_allocated: {before['cuda_max_allocated']:.2f} / {after['cuda_max_allocated']:.2f}")
    results = {
        "shape": list(logits.shape), "dtype": str(args.dtype), "device": str(device), "fp32_logits_bytes": logits.numel() * 4,
        "top_k": TOP_K, "torch": torch.__version__, "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
