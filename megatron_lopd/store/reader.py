"""Reading a teacher store: random access, batches, and data-parallel epoch partitions.

    store = TeacherStore.open(path, require={"teacher_fingerprint": fp_T,
                                             "tokenizer_fingerprint": fp_tok})
    len(store); store[i]; store.get_batch([i, j, ...])         # -> SequenceRecord(s)
    prompt_lens, response_lens = store.lengths()               # cheap, for packing
    for i in store.epoch_indices(seed, epoch, dp_rank, dp_size): ...

`open` refuses (ArtifactError) a store that is not complete, has an unknown schema
version, lacks a shard or has a shard file whose size differs from its done marker
(truncation); with ``verify_checksums=True`` (default) every chunk read is checked
against its crc32c and a mismatch raises `ChecksumError` naming the array and shard.
A ``require`` entry that differs from the store's provenance raises ConsistencyError
naming both values. `verify_store` reads everything up front.

Reads bypass zarr-python's codec pipeline (see `format.py`): chunks are read with
``pread`` and decoded with numcodecs' Blosc, a few microseconds of Python per chunk. A
small per-process LRU of decoded prompt chunks (``cache_bytes``) serves prompts that
share a chunk; response-axis chunks hold one sequence each and are not cached.
``load_topk=False`` skips the top-k arrays (most of the bytes) for losses that use only
the sampled-token log-probs.

DataLoader workers: the store pickles without file descriptors or cache and reopens
files lazily, so it works with fork and spawn start methods alike. One TeacherStore is
not safe to share between threads (its cache and descriptors are per object); worker
processes each have their own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError
from megatron_lopd.store.format import ChunkCache, ForkSafe, ShardedArray, read_small_array
from megatron_lopd.store.layout import (PER_SEQUENCE, ShardMarker, done_shards, marker_path, read_meta, shard_dir,
                                        size_mismatch, store_nbytes, token_array_names)
from megatron_lopd.store.schema import (SEQUENCES_DIR, TOPK_VOCABULARY, SequenceRecord, StoreMeta, StoreProvenance,
                                        decode_topk_inplace, uint64_to_hash)


def check_provenance(provenance: StoreProvenance, require: dict[str, Any] | None, where: str) -> None:
    """ConsistencyError naming both values for the first ``require`` entry that differs."""
    for key, wanted in (require or {}).items():
        have = provenance.get(key)
        if have != wanted:
            raise ConsistencyError(
                f"teacher store {where}: {key} is {have!r} but {wanted!r} is required",
                "use the store scored with the required model/tokenizer, or rescore the rollouts with it",
            )


class TeacherStore(ForkSafe):
    """A complete, checked teacher store opened for reading. Build with `TeacherStore.open`."""

    def __init__(self, path: Path, meta: StoreMeta, per_seq: dict[str, np.ndarray], *, verify_checksums: bool,
                 load_topk: bool, cache_bytes: int, num_threads: int):
        self.path = path
        self.meta = meta
        self.verify_checksums = verify_checksums
        self.load_topk = load_topk and meta.top_k > 0
        self.cache_bytes = cache_bytes
        self.num_threads = max(1, int(num_threads))
        self._prompt_lens = per_seq["prompt_lens"].astype(np.int64)
        self._response_lens = per_seq["response_lens"].astype(np.int64)
        self._sample_index = per_seq["sample_index"]
        self._content_hash = per_seq["content_hash"]
        self._prompt_id = per_seq["prompt_id"]
        # Start of each sequence inside its shard's concatenated prompt / response arrays.
        sps = meta.sequences_per_shard
        first = np.arange(len(self._prompt_lens)) // sps * sps
        self._prompt_start = _starts_within_shards(self._prompt_lens, first)
        padded = -(-self._response_lens // meta.chunk_tokens) * meta.chunk_tokens  # chunk-aligned starts
        self._response_start = _starts_within_shards(padded, first)
        self._arrays: dict[int, dict[str, ShardedArray]] = {}
        self._vocabularies: dict[int, np.ndarray] = {}  # shard -> its top-k vocabulary (schema docstring)
        self._cache = ChunkCache(cache_bytes)
        self._lock = threading.Lock()
        self._pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a fork does not inherit threads

    # ---- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, require: dict[str, Any] | None = None, verify_checksums: bool = True,
             load_topk: bool = True, cache_bytes: int = 64 << 20, num_threads: int = 2) -> "TeacherStore":
        """Open a finalized store; see the module docstring for what is refused.

        ``num_threads``: threads `get_batch` decodes with (Blosc releases the GIL); 1 reads
        in the calling thread only. With many DataLoader workers per GPU, 1 avoids
        oversubscribing the CPU.
        """
        import zarr

        path = Path(path)
        meta = read_meta(path)
        if not meta.complete:
            done = len(done_shards(path, meta))
            raise ArtifactError(
                f"teacher store {path} is incomplete ({done} of {meta.num_shards} shards done, not finalized)",
                "finish the scoring workers, then run finalize_store / `lopd store finalize`",
            )
        check_provenance(meta.provenance, require, str(path))
        for s in range(meta.num_shards):
            _check_shard_files(path, s)
        try:
            group = zarr.open_group(path / SEQUENCES_DIR, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise ArtifactError(f"teacher store {path}: {SEQUENCES_DIR}/ is missing", "run finalize_store again") from exc
        per_seq = {name: read_small_array(group, name, f"teacher store {path}") for name in PER_SEQUENCE}
        if any(len(v) != meta.num_sequences for v in per_seq.values()):
            raise ArtifactError(f"teacher store {path}: per-sequence arrays do not have {meta.num_sequences} entries",
                                "run finalize_store again")
        return cls(path, meta, per_seq, verify_checksums=verify_checksums, load_topk=load_topk,
                   cache_bytes=cache_bytes, num_threads=num_threads)

    def _local_state(self) -> dict:
        return {"_arrays": {}, "_vocabularies": {}, "_cache": ChunkCache(self.cache_bytes), "_pool": None}

    def close(self) -> None:
        for arrays in self._arrays.values():
            for arr in arrays.values():
                arr.close()
        self._arrays.clear()
        self._vocabularies.clear()
        self._cache.clear()
        if self._pool is not None and self._pool[0] == os.getpid():
            self._pool[1].shutdown(wait=False)
        self._pool = None

    # ---- properties -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.num_sequences

    @property
    def provenance(self) -> StoreProvenance:
        return self.meta.provenance

    @property
    def top_k(self) -> int:
        return self.meta.top_k

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def has_rollout_logprobs(self) -> bool:
        return self.meta.has_rollout_logprobs

    @property
    def num_tokens(self) -> int:
        """Scored (response) tokens in the store."""
        return int(self._response_lens.sum())

    @property
    def num_prompt_tokens(self) -> int:
        return int(self._prompt_lens.sum())

    @property
    def nbytes(self) -> int:
        """Bytes on disk (all files of the store)."""
        return store_nbytes(self.path)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_lens, response_lens) int32 arrays, one entry per sequence."""
        return self._prompt_lens.astype(np.int32), self._response_lens.astype(np.int32)

    def prompt_ids_of(self, indices: Iterable[int] | None = None) -> list[str]:
        """Source-dataset prompt ids (all, or of ``indices``) without reading token data."""
        sel = self._prompt_id if indices is None else self._prompt_id[np.asarray(list(indices), dtype=np.int64)]
        return [str(v) for v in sel]

    def content_hashes(self) -> list[str]:
        """Stored content hash of every sequence (compare with the rollout artifact's)."""
        return [uint64_to_hash(v) for v in self._content_hash]

    # ---- reading --------------------------------------------------------------------------

    def _shard_arrays(self, shard: int) -> dict[str, ShardedArray]:
        arrays = self._arrays.get(shard)
        if arrays is not None:
            return arrays
        with self._lock:
            arrays = self._arrays.get(shard)
            if arrays is not None:
                return arrays
            base = shard_dir(self.path, shard)
            arrays = {n: ShardedArray(base / n, f"array {n!r} of shard {shard}", self.verify_checksums)
                      for n in token_array_names(self.meta, with_topk=self.load_topk)}
            if self.load_topk:
                import zarr

                group = zarr.open_group(base, mode="r")
                self._vocabularies[shard] = read_small_array(group, TOPK_VOCABULARY, f"teacher store {self.path} shard {shard}")
            self._arrays[shard] = arrays
        return arrays

    def __getitem__(self, index: int) -> SequenceRecord:
        n = self.meta.num_sequences
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"TeacherStore indices are integers, got {type(index).__name__} (use get_batch)")
        if not -n <= index < n:
            raise IndexError(f"sequence {index} out of range for a store of {n}")
        index = int(index) % n
        shard = index // self.meta.sequences_per_shard
        arrays = self._shard_arrays(shard)
        p0, p1 = int(self._prompt_start[index]), int(self._prompt_start[index] + self._prompt_lens[index])
        r0, r1 = int(self._response_start[index]), int(self._response_start[index] + self._response_lens[index])

        def read(name: str) -> np.ndarray:
            # Uncached: a response-axis chunk holds one sequence (chunk-aligned starts), so a
            # cache would only add a copy; prompt chunks are shared and go through it below.
            return arrays[name].read(r0, r1)

        response, teacher = read("response_ids"), read("teacher_logprobs")
        topk_ids = topk_lp = None
        if self.load_topk:
            try:
                topk_ids, topk_lp = decode_topk_inplace(response, teacher, read("topk_ids"), read("topk_logprobs"),
                                                        self._vocabularies[shard])
            except IndexError as exc:
                raise ArtifactError(f"teacher store {self.path}: array 'topk_ids' of shard {shard} indexes past its "
                                    f"{TOPK_VOCABULARY} ({exc})", "rescore this shard and finalize again") from exc
        return SequenceRecord(
            prompt_ids=arrays["prompt_ids"].read(p0, p1, self._cache, (shard,)),
            response_ids=response,
            teacher_logprobs=teacher,
            topk_ids=topk_ids,
            topk_logprobs=topk_lp,
            rollout_logprobs=read("rollout_logprobs") if self.has_rollout_logprobs else None,
            prompt_id=str(self._prompt_id[index]),
            sample_index=int(self._sample_index[index]),
            index=index,
        )

    def get_batch(self, indices: Iterable[int]) -> list[SequenceRecord]:
        """Records of ``indices``, in the given order (duplicates allowed)."""
        indices = [int(i) for i in indices]
        threads = min(self.num_threads, len(indices))
        if threads <= 1:
            return [self[i] for i in indices]
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), ThreadPoolExecutor(self.num_threads, thread_name_prefix="teacher-store"))
        parts = self._pool[1].map(lambda part: [self[i] for i in part], [indices[t::threads] for t in range(threads)])
        out: list[SequenceRecord] = [None] * len(indices)  # type: ignore[list-item]
        for t, records in enumerate(parts):
            out[t::threads] = records
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def epoch_indices(self, seed: int, epoch: int, dp_rank: int, dp_size: int, *, shuffle: bool = True,
                      drop_last: bool = True) -> np.ndarray:
        """This data-parallel rank's sequence indices for one epoch (int64).

        One permutation of all sequences per (seed, epoch) (numpy PCG64 seeded with
        [seed, epoch], identical on every rank and machine); rank r takes every
        ``dp_size``-th entry starting at r, so ranks are disjoint and get equal counts.
        ``drop_last=True`` drops the last ``len % dp_size`` entries of the permutation
        (a different subset each epoch); ``drop_last=False`` pads by repeating the first
        entries of the permutation, so every sequence is covered and a few appear twice.
        """
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"epoch_indices: dp_rank={dp_rank} dp_size={dp_size}", "need 0 <= dp_rank < dp_size")
        n = len(self)
        if drop_last and n < dp_size:
            raise ConfigError(f"teacher store {self.path} has {n} sequences, fewer than dp_size={dp_size}",
                              "use fewer data-parallel ranks or drop_last=False")
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
        if drop_last:
            order = order[: n // dp_size * dp_size]
        else:
            total = -(-n // dp_size) * dp_size
            order = np.resize(order, total)  # repeats from the start
        return order[dp_rank::dp_size].astype(np.int64)


def _starts_within_shards(lens: np.ndarray, first_of_shard: np.ndarray) -> np.ndarray:
    ends = np.cumsum(lens)
    starts = ends - lens
    return starts - starts[first_of_shard] if len(lens) else starts


def _check_shard_files(path: Path, shard: int) -> None:
    """Every data file named by the shard's marker exists with its recorded size."""
    marker = ShardMarker.read(marker_path(path, shard))
    if marker is None:
        raise ArtifactError(f"teacher store {path}: shard {shard} has no done marker although the store is complete",
                            "the store was modified after finalizing: rescore that shard and finalize again")
    mismatch = size_mismatch(shard_dir(path, shard), marker)
    if mismatch is not None:
        rel, actual, size = mismatch
        what = (f"shard {shard} file {rel} is missing" if actual is None else
                f"array {rel.split('/')[0]!r} of shard {shard} is {actual} bytes, its marker says {size} (truncated or rewritten)")
        raise ArtifactError(f"teacher store {path}: {what}", "delete that shard's marker, rerun its writer and finalize again")
