"""Teacher store benchmark: bytes/token, write throughput, random-read throughput.

    python benchmarks/bench_store.py [--sequences 192] [--median-len 1500] [--out results.json]

Data: `megatron_lopd.store.synthetic` (Zipf-like token frequencies over a 151,936-token
vocabulary, per-sequence working vocabularies, peaked teacher distributions: median top-1
probability 0.92; see that module). ``--permute-ids`` is the pessimistic variant whose
ids carry no frequency order. Everything is measured in one run, against references
measured in the same run:

1. bytes/token on disk at k = 0, 16, 64 (all files of a finalized store, with rollout
   log-probs), per array, and the same arrays compressed with plain Blosc-zstd
   (clevel 3, byte-shuffle, position-major, same chunks + crc32c) as the baseline;
2. write throughput (validate + encode + compress + write + fsync) with 1 and 2 writer
   processes on one store (fork; records generated before timing);
3. random-read throughput of 32-sequence batches (page cache warm) through
   `TeacherStore`, against a numpy memmap of the same decoded arrays (uncompressed) in
   the same run; zarr-python, zarr-python with the `zarrs` codec pipeline and
   tensorstore (the last two if installed) on the same store for reference. Wall-clock
   figures depend on other load on the machine; tokens per CPU-second of the reading
   process (all its threads) are reported next to them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from numcodecs import Blosc
from tqdm import tqdm

from megatron_lopd.store import (
    SequenceRecord,
    StoreProvenance,
    StoreWriter,
    SyntheticSpec,
    TeacherStore,
    check_store_files,
    finalize_store,
    synthetic_record,
    verify_store,
)
from megatron_lopd.store.schema import aligned_positions

PROV = StoreProvenance(teacher_fingerprint="model-bench", tokenizer_fingerprint="tok-bench", engine="synthetic")


def generate(n: int, spec: SyntheticSpec) -> list[SequenceRecord]:
    out = []
    with tqdm(total=n, desc="generate", unit="seq", disable=None) as bar:
        for i in range(n):
            out.append(synthetic_record(i, spec))
            bar.update()
            bar.set_postfix(tokens=sum(len(r.response_ids) for r in out))
    return out


def with_k(records: list[SequenceRecord], k: int) -> list[SequenceRecord]:
    return [replace(r, topk_ids=r.topk_ids[:, :k] if k else None, topk_logprobs=r.topk_logprobs[:, :k] if k else None)
            for r in records]


def _write_worker(path, records, worker, num_workers, start, out):
    import zarr  # noqa: F401  (imported before the clock starts)

    writer = StoreWriter.open(path)
    start.wait()
    t0 = time.perf_counter()
    for s in writer.pending_shards(worker=worker, num_workers=num_workers):
        writer.write_shard(s, records[writer.shard_range(s).start:writer.shard_range(s).stop])
    out.put(time.perf_counter() - t0)


def write_store(path: Path, records, k: int, sps: int, workers: int, chunk_tokens: int, clevel: int) -> float:
    """Wall seconds for ``workers`` processes to write every shard (excludes finalize)."""
    shutil.rmtree(path, ignore_errors=True)
    StoreWriter.create(path, num_sequences=len(records), top_k=k, vocab_size=151936, provenance=PROV,
                       sequences_per_shard=sps, has_rollout_logprobs=True, chunk_tokens=chunk_tokens,
                       clevel=clevel)
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_write_worker, args=(path, records, w, workers, start, out)) for w in range(workers)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"writer process failed with exit code {p.exitcode}")
    return time.perf_counter() - t0


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def per_array_bytes(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in (path / "shards").rglob("c/*"):
        if f.is_file():
            out[f.parent.parent.name] = out.get(f.parent.parent.name, 0) + f.stat().st_size
    for f in (path / "shards").rglob("c/*/*"):
        if f.is_file():
            out[f.parent.parent.parent.name] = out.get(f.parent.parent.parent.name, 0) + f.stat().st_size
    return out


def baseline_bytes(records, k: int, chunk_tokens: int) -> dict[str, int]:
    """Plain Blosc-zstd (clevel 3, byte-shuffle) on position-major raw arrays, same chunks, +4 B crc."""
    codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
    arrays = {
        "response_ids": np.concatenate([r.response_ids for r in records]),
        "teacher_logprobs": np.concatenate([r.teacher_logprobs for r in records]),
        "rollout_logprobs": np.concatenate([r.rollout_logprobs for r in records]),
        "prompt_ids": np.concatenate([r.prompt_ids for r in records]),
    }
    if k:
        arrays["topk_ids"] = np.concatenate([r.topk_ids[:, :k] for r in records])
        arrays["topk_logprobs"] = np.concatenate([r.topk_logprobs[:, :k] for r in records])
    return {name: sum(len(codec.encode(np.ascontiguousarray(a[s:s + chunk_tokens]))) + 4
                      for s in range(0, len(a), chunk_tokens)) for name, a in arrays.items()}


def topk_entropy_bytes(path: Path, tokens: int) -> dict[str, float]:
    """Order-0 entropy of the stored top-k symbols, B/token: what an ideal per-symbol coder
    (no context model) would need for the same encoded arrays, per shard and per rank row."""
    import zarr

    def bits(values: np.ndarray) -> float:
        counts = np.unique(values, return_counts=True)[1]
        return float(-(counts * np.log2(counts / counts.sum())).sum())

    out = {"topk_ids": 0.0, "topk_logprobs": 0.0}
    for shard in sorted(d for d in (path / "shards").iterdir() if d.is_dir()):
        group = zarr.open_group(shard, mode="r")
        lens = group["response_lens"][...].astype(np.int64)
        chunk = group["topk_ids"].chunks[-1]
        real = aligned_positions(lens, chunk)[0]
        for name in out:
            stored = group[name][...][:, real]
            out[name] += sum(bits(row) for row in stored) / 8 / tokens
    return out


class MemmapReference:
    """The same decoded arrays, uncompressed in .npy files, read through np.memmap."""

    def __init__(self, store: TeacherStore, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        recs = store.get_batch(range(len(store)))
        self.plens, self.rlens = store.lengths()
        self.pstart = np.concatenate([[0], np.cumsum(self.plens, dtype=np.int64)])
        self.rstart = np.concatenate([[0], np.cumsum(self.rlens, dtype=np.int64)])
        fields = {"prompt_ids": None, "response_ids": None, "teacher_logprobs": None, "rollout_logprobs": None}
        if store.top_k:
            fields.update(topk_ids=None, topk_logprobs=None)
        self.mm = {}
        for name in fields:
            arr = np.concatenate([np.ascontiguousarray(getattr(r, name)) for r in recs])
            np.save(directory / f"{name}.npy", arr)
            self.mm[name] = np.load(directory / f"{name}.npy", mmap_mode="r")

    def get_batch(self, indices):
        out = []
        for i in indices:
            p0, p1, r0, r1 = self.pstart[i], self.pstart[i + 1], self.rstart[i], self.rstart[i + 1]
            out.append({name: np.array(mm[p0:p1] if name == "prompt_ids" else mm[r0:r1]) for name, mm in self.mm.items()})
        return out


def zarr_python_batch(store: TeacherStore, indices):
    """Reference: zarr-python's own read path on the same arrays (raw stored codes)."""
    import zarr

    pl, rl = store.lengths()
    out = []
    for i in indices:
        s = i // store.meta.sequences_per_shard
        r0 = int(store._response_start[i])
        p0 = int(store._prompt_start[i])
        base = store.path / "shards" / f"{s:06d}"
        rec = {n: zarr.open_array(base / n, mode="r")[..., r0:r0 + rl[i]]
               for n in ("response_ids", "teacher_logprobs", "rollout_logprobs", "topk_ids", "topk_logprobs")
               if (base / n).exists()}
        rec["prompt_ids"] = zarr.open_array(base / "prompt_ids", mode="r")[p0:p0 + pl[i]]
        out.append(rec)
    return out


def zarrs_reader(store: TeacherStore):
    """zarr-python with the `zarrs` (Rust) codec pipeline, if installed."""
    try:
        import zarr
        import zarrs  # noqa: F401
    except ImportError:
        return None

    def get_batch(indices):
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            return zarr_python_batch(store, indices)

    return get_batch


def tensorstore_reader(store: TeacherStore):
    try:
        import tensorstore as ts
    except ImportError:
        return None
    handles: dict = {}

    def arr(s, name):
        key = (s, name)
        if key not in handles:
            path = str(store.path / "shards" / f"{s:06d}" / name)
            handles[key] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result()
        return handles[key]

    names = ["response_ids", "teacher_logprobs", "rollout_logprobs"] + (["topk_ids", "topk_logprobs"] if store.top_k else [])
    pl, rl = store.lengths()

    def get_batch(indices):
        futures = []
        for i in indices:
            s = i // store.meta.sequences_per_shard
            r0, p0 = int(store._response_start[i]), int(store._prompt_start[i])
            futures.append(arr(s, "prompt_ids")[p0:p0 + pl[i]].read())
            for n in names:
                a = arr(s, n)
                futures.append((a[r0:r0 + rl[i]] if a.rank == 1 else a[:, r0:r0 + rl[i]]).read())
        return [f.result() for f in futures]

    return get_batch


def time_batches(fn, batches, tokens_per_batch, label, min_seconds=2.0) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process, all its threads)."""
    fn(batches[0])  # warm-up (opens files)
    done, tokens, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    with tqdm(total=len(batches), desc=label, unit="batch", leave=False, disable=None) as bar:
        while done < len(batches):
            fn(batches[done])
            tokens += tokens_per_batch[done]
            done += 1
            bar.update()
            bar.set_postfix(Mtok_s=f"{tokens / (time.perf_counter() - t0) / 1e6:.2f}")
            if time.perf_counter() - t0 > min_seconds and done >= 10:
                break
    return tokens / (time.perf_counter() - t0), tokens / max(1e-9, time.process_time() - c0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--median-len", type=int, default=1500)
    ap.add_argument("--sequences-per-shard", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--clevel", type=int, default=3, help="Blosc level of the store")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 16, 64])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--read-seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing repetitions (best is kept)")
    ap.add_argument("--permute-ids", action="store_true", help="ids carry no frequency order (pessimistic)")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_"))
    spec = SyntheticSpec(top_k=max(args.ks), response_len_median=args.median_len, permute_ids=args.permute_ids)
    records = generate(args.sequences, spec)
    tokens = sum(len(r.response_ids) for r in records)
    print(f"data: {args.sequences} sequences, {tokens} response tokens, "
          f"{sum(len(r.prompt_ids) for r in records)} prompt tokens, vocab {spec.vocab_size}, "
          f"ids {'permuted' if args.permute_ids else 'frequency-ordered'}; cpus {os.cpu_count()}")
    results: dict = {"sequences": args.sequences, "response_tokens": tokens, "chunk_tokens": args.chunk_tokens,
                     "permute_ids": args.permute_ids, "k": {}}
    rng = np.random.default_rng(0)
    for k in args.ks:
        recs = with_k(records, k)
        res: dict = {}
        path = work / f"store_k{k}"
        for workers in (1, 2):
            seconds = write_store(path, recs, k, args.sequences_per_shard, workers, args.chunk_tokens, args.clevel)
            res[f"write_tokens_per_s_{workers}proc"] = tokens / seconds
        finalize_store(path, verify=False)
        # The trainer's check before its first step (markers, sizes, every chunk's crc32c, no
        # decoding) against the full verify (decodes and re-hashes everything).
        res["check_seconds"] = min(_seconds(lambda: check_store_files(path)) for _ in range(args.repeats))
        res["verify_seconds"] = _seconds(lambda: verify_store(path))
        res["bytes_per_token"] = dir_bytes(path) / tokens
        arrays = per_array_bytes(path)
        res["array_bytes_per_token"] = {n: b / tokens for n, b in sorted(arrays.items())}
        base = baseline_bytes(recs, k, args.chunk_tokens)
        res["baseline_array_bytes_per_token"] = {n: b / tokens for n, b in sorted(base.items())}
        res["baseline_bytes_per_token"] = sum(base.values()) / tokens
        res["data_bytes_per_token"] = sum(arrays.values()) / tokens
        if k:
            res["topk_order0_entropy_bytes_per_token"] = topk_entropy_bytes(path, tokens)

        store = TeacherStore.open(path, cache_bytes=0)  # random batches of a large store rarely share chunks
        batches = [rng.integers(0, len(store), 32) for _ in range(args.batches)]
        rl = store.lengths()[1]
        batch_tokens = [int(rl[b].sum()) for b in batches]
        memmap = MemmapReference(store, work / f"memmap_k{k}")
        readers = {"store": store.get_batch, "memmap": memmap.get_batch,
                   "zarr_python": lambda b: zarr_python_batch(store, b)}
        if k:
            readers["store_no_topk"] = TeacherStore.open(path, load_topk=False, cache_bytes=0).get_batch
        for name, make in (("zarrs", zarrs_reader), ("tensorstore", tensorstore_reader)):
            fn = make(store)
            if fn is not None:
                readers[name] = fn
        # Interleaved repetitions, best of each: the machine may be shared with other jobs.
        for rep in range(args.repeats):
            for name, fn in readers.items():
                wall, cpu = time_batches(fn, batches, batch_tokens, name, args.read_seconds)
                res[f"read_{name}_tokens_per_s"] = max(wall, res.get(f"read_{name}_tokens_per_s", 0.0))
                res[f"read_{name}_tokens_per_cpu_s"] = max(cpu, res.get(f"read_{name}_tokens_per_cpu_s", 0.0))
        res["read_tokens_per_s"] = res["read_store_tokens_per_s"]
        results["k"][k] = res
        r = {n: res[f"read_{n}_tokens_per_s"] / 1e6 for n in readers}
        rc = {n: res[f"read_{n}_tokens_per_cpu_s"] / 1e6 for n in readers}
        print(f"k={k:>2}: {res['bytes_per_token']:.1f} B/token on disk ({res['data_bytes_per_token']:.1f} in data files; "
              f"plain Blosc-zstd {res['baseline_bytes_per_token']:.1f}) | write {res['write_tokens_per_s_1proc'] / 1e6:.2f} "
              f"M tok/s (1 proc), {res['write_tokens_per_s_2proc'] / 1e6:.2f} (2 procs)")
        print(f"   pre-training check {res['check_seconds']:.3f} s ({res['check_seconds'] / tokens * 1e6:.3f} s per M tokens), "
              f"full verify {res['verify_seconds']:.2f} s: check/verify {res['check_seconds'] / res['verify_seconds']:.3f}")
        print("   read M tok/s (wall): " + ", ".join(f"{n} {v:.2f}" for n, v in r.items())
              + f" | store/memmap {r['store'] / r['memmap']:.3f}")
        print("   read M tok per CPU-second: " + ", ".join(f"{n} {v:.2f}" for n, v in rc.items()))
        print("   per array B/token:", {n: round(v, 2) for n, v in res["array_bytes_per_token"].items()},
              "baseline:", {n: round(v, 2) for n, v in res["baseline_array_bytes_per_token"].items()})
        if k:
            print("   order-0 entropy of the stored top-k symbols, B/token:",
                  {n: round(v, 2) for n, v in res["topk_order0_entropy_bytes_per_token"].items()})
        store.close()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
