"""Writing a teacher store: many independent writer processes, one finalizer.

Usage (each scoring process, on any node, one per GPU or SLURM task)::

    writer = StoreWriter.create(path, num_sequences=N, top_k=16, vocab_size=V,
                                provenance=prov, has_rollout_logprobs=True)
    for shard in writer.pending_shards(worker=rank, num_workers=world):
        records = score(writer.shard_range(shard))      # sequences of that shard, in order
        writer.write_shard(shard, records)
    # once, after every writer has exited (e.g. a dependent SLURM job):
    finalize_store(path)

Rules that make this safe:

- ``create`` is idempotent: the root ``zarr.json`` is published with an exclusive
  ``link``, so exactly one caller creates it and every other caller compares parameters
  (mismatch: `ArtifactError` with the fix). It runs before any shard is written.
- A store shard is a contiguous range of ``sequences_per_shard`` sequence indices. Its
  arrays are buffered in memory and written once into a private temporary directory,
  fsynced, renamed into ``shards/NNNNNN`` (atomic), and only then is the done marker
  ``markers/NNNNNN.json`` written (atomically, also fsynced). A writer killed at any
  point leaves no marker, so a rerun writes that shard again from scratch (stale
  temporaries are removed) and never touches shards that have markers. Compression is
  deterministic, so a resumed store is byte-identical to an uninterrupted one.
- Writers never write root attributes; `finalize_store` (`store.finalize`, one process) checks every shard,
  gathers the per-sequence arrays store-wide, consolidates metadata and sets ``complete``.
- ``pending_shards(worker=i, num_workers=n)`` assigns shard ``s`` to worker ``s % n``
  (deterministic, balanced) and lists the ones without a marker.
- One writer per shard: ``write_shard`` holds an advisory lock ``markers/NNNNNN.lock``
  (`megatron_lopd.runtime.files.OutputLock`: host, pid, SLURM job) while it writes; a
  second process gets `LockedError` naming the holder (``claim_shard`` takes the lock
  before the expensive scoring, so a scorer skips shards another live one holds). A lock
  of a dead holder is taken over with a warning. `finalize_store` holds the store's
  ``.lopd.lock``: one finalizer at a time.
- ``overwrite`` deletes only a directory that is provably a teacher store (its root
  ``zarr.json`` has the store attribute) and no live writer holds; anything else is
  refused naming what was found.

Memory: a writer holds one shard (``sequences_per_shard`` sequences) at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.runtime.files import (LOCK_NAME, LockedError, OutputLock, atomic_write, describe_holder, fsync_path,
                                        os_error_fix, os_error_reason, publish_once, refuse_foreign_dir, remove_owned_dir)
import megatron_lopd.store.layout as layout
from megatron_lopd.store.format import write_small_array, write_token_array
from megatron_lopd.store.layout import GROUP_JSON, ShardMarker, is_teacher_store, json_bytes, live_locks, read_meta, shard_name
from megatron_lopd.store.schema import (ENCODINGS, MARKERS_DIR, SHARDS_DIR, TOPK_VOCABULARY, RecordError, SequenceRecord, StoreMeta,
                                        StoreProvenance, TEACHER_LOGPROBS, TEACHER_SIGNALS, aligned_positions, encode_topk, hash_to_uint64,
                                        validate_record)


def _content_digest(hashes: Iterable[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


class StoreWriter:
    """Writes whole shards of one teacher store. See the module docstring for the protocol."""

    def __init__(self, path: Path, meta: StoreMeta, fsync: bool = True, overwrite_flag: str = "overwrite=True"):
        self.path = Path(path)
        self.meta = meta
        # fsync makes a finished shard survive a node crash / power loss too; SIGKILL safety
        # does not need it (the page cache survives the process). ~5 ms per file here.
        self.fsync = fsync
        self.overwrite_flag = overwrite_flag
        self._claims: dict[int, OutputLock] = {}

    # ---- creation / opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        num_sequences: int,
        top_k: int,
        vocab_size: int,
        provenance: StoreProvenance | dict[str, Any],
        sequences_per_shard: int = 256,
        has_rollout_logprobs: bool,
        chunk_tokens: int = 2048,
        clevel: int = 3,
        teacher_signal: str = TEACHER_LOGPROBS,
        overwrite: bool = False,
        fsync: bool = True,
        overwrite_flag: str = "overwrite=True",
    ) -> "StoreWriter":
        """Create the store layout, or open it if it exists with identical parameters.

        ``overwrite=True`` deletes an existing store first: do that from one process
        before starting the writers, never from several concurrent ones. Only a directory
        that is provably a teacher store, with no live writer, is deleted; anything else
        raises `ArtifactError` naming what is there. ``overwrite_flag``: how messages name
        the option to the user (the CLI passes ``--overwrite``).
        """
        path = Path(path)
        for name, value, low in (("num_sequences", num_sequences, 1), ("vocab_size", vocab_size, 1),
                                 ("sequences_per_shard", sequences_per_shard, 1), ("top_k", top_k, 0),
                                 ("chunk_tokens", chunk_tokens, 16), ("clevel", clevel, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"teacher store {path}: {name}={value!r} must be an integer >= {low}",
                                  f"pass a valid {name}")
        if top_k > vocab_size:
            raise ConfigError(f"teacher store {path}: top_k={top_k} exceeds vocab_size={vocab_size}", "lower top_k")
        if teacher_signal not in TEACHER_SIGNALS:
            raise ConfigError(f"teacher store {path}: teacher_signal={teacher_signal!r}", f"use one of {', '.join(TEACHER_SIGNALS)}")
        if clevel > 9:
            raise ConfigError(f"teacher store {path}: clevel={clevel} must be in 1..9", "pass a zstd level in 1..9")
        meta = StoreMeta(
            num_sequences=int(num_sequences), top_k=int(top_k), vocab_size=int(vocab_size),
            sequences_per_shard=int(sequences_per_shard), has_rollout_logprobs=bool(has_rollout_logprobs),
            provenance=StoreProvenance.coerce(provenance), chunk_tokens=int(chunk_tokens), clevel=int(clevel),
            teacher_signal=teacher_signal,
        )
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"teacher store {path} is a file, not a directory", "choose a directory path for the store")
        if overwrite and path.exists():

            if is_teacher_store(path):  # never delete under a live writer
                busy = live_locks(path)
                if busy:
                    raise LockedError(
                        f"{overwrite_flag} refused: teacher store {path} is being written by "
                        f"{describe_holder(busy[0][1])} (lock {busy[0][0]})",
                        "wait for that process to finish or stop it; nothing was deleted")
            remove_owned_dir(path, is_teacher_store, "teacher store", flag=overwrite_flag)
        if not (path / "zarr.json").exists():  # another creator's root temporary may be there for a moment
            refuse_foreign_dir(path, f"{path}: exists and is not a teacher store", "choose an empty or new directory for the store",
                               ignore=lambda name: name.startswith((".zarr.json.", ".lopd-write-probe.", f".{LOCK_NAME}.")) or name == LOCK_NAME)
        path.mkdir(parents=True, exist_ok=True)
        # Exactly one creator publishes the root; a second one compares instead.
        created = publish_once(path / "zarr.json", layout.root_json(meta))
        if not created:
            existing = read_meta(path)
            if existing.layout_key() != meta.layout_key():
                diff = _describe_diff(existing.layout_key(), meta.layout_key())
                raise ArtifactError(
                    f"teacher store {path} exists with different parameters: {diff}",
                    f"use a new path, pass the parameters it was created with, or {overwrite_flag} to rescore from scratch",
                )
            meta = existing
        for sub in (SHARDS_DIR, MARKERS_DIR):
            (path / sub).mkdir(exist_ok=True)
        if not (path / SHARDS_DIR / "zarr.json").exists():
            atomic_write(path / SHARDS_DIR / "zarr.json", json_bytes(GROUP_JSON), fsync=True)
        return cls(path, meta, fsync, overwrite_flag=overwrite_flag)

    @classmethod
    def open(cls, path: str | os.PathLike, *, fsync: bool = True, overwrite_flag: str = "overwrite=True") -> "StoreWriter":
        """Open an existing store for writing more shards (a resumed run)."""
        path = Path(path)
        meta = read_meta(path)
        if meta.complete:
            raise ArtifactError(f"teacher store {path} is already complete (finalized)",
                                f"nothing to write; pass {overwrite_flag} to rescore")
        return cls(path, meta, fsync, overwrite_flag=overwrite_flag)

    # ---- shards ---------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self.meta.num_shards

    def shard_range(self, shard_id: int) -> range:
        if not 0 <= shard_id < self.num_shards:
            raise ConfigError(f"teacher store {self.path}: shard {shard_id} out of range [0, {self.num_shards})",
                              "use writer.pending_shards() / shard_ranges()")
        return layout.shard_range(self.meta, shard_id)

    def shard_ranges(self) -> list[range]:
        """Sequence-index range of every shard (contiguous, in order)."""
        return [self.shard_range(s) for s in range(self.num_shards)]

    def shard_of(self, seq_index: int) -> int:
        if not 0 <= seq_index < self.meta.num_sequences:
            raise ConfigError(f"teacher store {self.path}: sequence {seq_index} out of range [0, {self.meta.num_sequences})",
                              "check the rollout index")
        return seq_index // self.meta.sequences_per_shard

    def marker_path(self, shard_id: int) -> Path:
        return layout.marker_path(self.path, shard_id)

    def marker(self, shard_id: int) -> ShardMarker | None:
        return ShardMarker.read(self.marker_path(shard_id))

    def lock_path(self, shard_id: int) -> Path:
        return self.path / MARKERS_DIR / f"{shard_name(shard_id)}.lock"

    def claim_shard(self, shard_id: int) -> OutputLock:
        """Take shard ``shard_id``'s writer lock until `release_shard` (or `write_shard` returns).

        Raises `LockedError` naming the holder while another live process holds it; a dead
        holder's lock is taken over with a warning. Claim before expensive work (scoring),
        then check `is_done` again: the previous holder may have finished the shard.
        """

        self.shard_range(shard_id)  # range check
        if shard_id in self._claims:
            return self._claims[shard_id]
        lock = OutputLock(self.lock_path(shard_id), f"teacher store shard {shard_id}")
        holder = lock.try_acquire()
        if holder is not None:
            raise LockedError(
                f"teacher store {self.path}: shard {shard_id} is being written by {describe_holder(holder)} "
                f"(lock {lock.path})",
                "let that process finish the shard, or stop it; a dead holder's lock is taken over automatically")
        self._claims[shard_id] = lock
        return lock

    def release_shard(self, shard_id: int) -> None:
        lock = self._claims.pop(shard_id, None)
        if lock is not None:
            lock.release()

    def is_done(self, shard_id: int) -> bool:
        return self.marker_path(shard_id).exists()

    def done_shards(self) -> list[int]:
        return layout.done_shards(self.path, self.meta)

    def pending_shards(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Shards of ``worker`` (shard s belongs to worker s % num_workers) without a done marker."""
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ConfigError(f"teacher store writer: worker={worker} num_workers={num_workers}",
                              "need 0 <= worker < num_workers")
        return [s for s in range(worker, self.num_shards, num_workers) if not self.is_done(s)]

    def write_shard(self, shard_id: int, records: list[SequenceRecord]) -> ShardMarker:
        """Validate and write all sequences of one shard; returns its done marker.

        A shard that already has a marker is not rewritten: identical content returns the
        existing marker, different content raises `ArtifactError`. The shard's writer lock is
        held meanwhile (taken here unless `claim_shard` took it; released on return either way):
        `LockedError` if another live process holds it.
        """
        self.claim_shard(shard_id)
        try:
            return self._write_shard_locked(shard_id, records)
        finally:
            self.release_shard(shard_id)

    def _write_shard_locked(self, shard_id: int, records: list[SequenceRecord]) -> ShardMarker:
        rng = self.shard_range(shard_id)
        if len(records) != len(rng):
            raise RecordError(
                f"teacher store {self.path}: shard {shard_id} holds sequences {rng.start}..{rng.stop - 1} "
                f"({len(rng)}), got {len(records)} records",
                "pass exactly the records of writer.shard_range(shard) in index order",
            )
        m = self.meta
        valid = [validate_record(rec, rng.start + j, top_k=m.top_k, vocab_size=m.vocab_size,
                                 has_rollout_logprobs=m.has_rollout_logprobs, teacher_signal=m.teacher_signal)
                 for j, rec in enumerate(records)]
        hashes = [rec.content_hash for rec in valid]
        digest = _content_digest(hashes)
        existing = self.marker(shard_id)
        if existing is not None:
            if existing.content_digest != digest:
                raise ArtifactError(
                    f"teacher store {self.path}: shard {shard_id} is already written with different content",
                    f"the rollouts changed: score into a new store (or {self.overwrite_flag})",
                )
            return existing

        shards_dir = self.path / SHARDS_DIR
        final = layout.shard_dir(self.path, shard_id)
        for stale in shards_dir.glob(f".tmp-{shard_name(shard_id)}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a writer killed mid-shard
        tmp = shards_dir / f".tmp-{shard_name(shard_id)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self._write_arrays(tmp, shard_id, valid, hashes)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            if self.fsync:
                for p in tmp.rglob("*"):
                    fsync_path(p)
                fsync_path(tmp)
            if final.exists():  # renamed by a writer killed before its marker: redo
                shutil.rmtree(final)
            os.rename(tmp, final)  # a whole directory at once: more than atomic_write's one file
            if self.fsync:
                fsync_path(shards_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # a full disk, a read-only or vanished directory: one line
                raise ArtifactError(
                    f"teacher store {self.path}: cannot write shard {shard_id} ({exc.filename or final}): "
                    f"{os_error_reason(exc)}", os_error_fix(exc)) from None
            raise
        marker = ShardMarker(
            shard=shard_id, first_sequence=rng.start, num_sequences=len(rng),
            prompt_tokens=int(sum(len(r.prompt_ids) for r in valid)),
            response_tokens=int(sum(len(r.response_ids) for r in valid)),
            content_digest=digest, files={k: v for k, v in files.items() if not k.endswith("zarr.json")},
            written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=socket.gethostname(), pid=os.getpid(),
        )
        atomic_write(self.marker_path(shard_id), json_bytes(marker.__dict__), fsync=self.fsync)
        return marker

    def _write_arrays(self, directory: Path, shard_id: int, recs: list[SequenceRecord], hashes: list[str]) -> None:
        import zarr

        m = self.meta
        rng = self.shard_range(shard_id)
        group = zarr.open_group(directory, mode="w-", attributes={"shard": shard_id, "first_sequence": rng.start,
                                                                  "num_sequences": len(rng)})
        cat = lambda name, dtype: np.concatenate([getattr(r, name) for r in recs]).astype(dtype, copy=False)  # noqa: E731
        token_kw = {"chunk_tokens": m.chunk_tokens, "clevel": m.clevel}
        write_token_array(group, "prompt_ids", cat("prompt_ids", np.int32), **token_kw)
        # Response-axis arrays: each sequence starts on a chunk boundary (schema docstring).
        positions, slots = aligned_positions([len(r.response_ids) for r in recs], m.chunk_tokens)

        def aligned(values: np.ndarray) -> np.ndarray:
            out = np.zeros((*values.shape[:-1], slots), dtype=values.dtype)
            out[..., positions] = values
            return out

        response, teacher = cat("response_ids", np.int32), cat("teacher_logprobs", np.float32)
        write_token_array(group, "response_ids", aligned(response), **token_kw)
        write_token_array(group, "teacher_logprobs", aligned(teacher), **token_kw)
        if m.has_rollout_logprobs:
            write_token_array(group, "rollout_logprobs", aligned(cat("rollout_logprobs", np.float32)), **token_kw)
        if m.top_k:
            ids, codes, vocabulary = encode_topk(response, teacher, np.concatenate([r.topk_ids for r in recs]),
                                                 np.concatenate([r.topk_logprobs for r in recs]))
            write_small_array(group, TOPK_VOCABULARY, vocabulary, clevel=m.clevel)
            write_token_array(group, "topk_ids", aligned(ids), attributes={"encoding": ENCODINGS["topk_ids"]},
                              **token_kw)
            write_token_array(group, "topk_logprobs", aligned(codes),
                              attributes={"encoding": ENCODINGS["topk_logprobs"]}, **token_kw)
        per_seq = {
            "prompt_lens": np.array([len(r.prompt_ids) for r in recs], np.int32),
            "response_lens": np.array([len(r.response_ids) for r in recs], np.int32),
            "sample_index": np.array([r.sample_index for r in recs], np.int32),
            "content_hash": np.array([hash_to_uint64(h) for h in hashes], np.uint64),
            "prompt_id": np.array([r.prompt_id for r in recs], dtype=object),
        }
        for name, values in per_seq.items():
            write_small_array(group, name, values, clevel=m.clevel)


def _describe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _describe_diff(a, b, prefix=f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif a != b:
            parts.append(f"{prefix}{key}: store has {a!r}, requested {b!r}")
    return "; ".join(parts)

