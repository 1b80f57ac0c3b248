"""Whole-store checks (`verify_store`, `check_store_files`) and a summary for humans (`inspect_store`).

`check_store_files` is the fast pre-training check: every shard's done marker, shard
directory and array metadata present, every data file with its marker's size and (with
``checksums=True``) every shard index and inner chunk matching its crc32c. It reads each
file once and decodes nothing; it raises `ArtifactError` (`ChecksumError` for a checksum)
with the first problem. `inspect_store` checks presence and sizes only (no reads).

`verify_store` never raises for a damaged store: it returns a `VerifyReport` whose
``problems`` list says what is wrong (the first one is what ``lopd store verify`` prints)
and ``ok`` is True only if every check passed:

- root metadata readable, schema version known, ``complete`` set (unless
  ``require_complete=False``, which the finalizer uses before it sets it);
- every shard has a done marker, its files exist with the sizes the marker records;
- every shard index and every inner chunk of every token array matches its crc32c and
  decodes; array lengths agree with the per-sequence lengths and the marker's counts;
- decoded ids lie in the vocabulary, top-k log-probs are finite and <= 0, and the content
  hash recomputed from the decoded token ids equals the stored one for every sequence;
- after finalize, the store-wide per-sequence arrays equal the shards' ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lopd.errors import ArtifactError, LopdError
from megatron_lopd.store.format import ChecksumError, ShardedArray, read_small_array
from megatron_lopd.store.layout import (PER_SEQUENCE, ShardMarker, done_shards, marker_path, read_meta, shard_array_names,
                                        shard_dir, shard_problem, shard_range, size_mismatch, store_nbytes, token_array_names)
from megatron_lopd.store.schema import (SEQUENCES_DIR, TEACHER_LOGPROBS, TOPK_VOCABULARY, StoreMeta, aligned_positions, content_hash,
                                        decode_topk_inplace, uint64_to_hash)


@dataclass
class StoreSummary:
    """What `finalize_store` and `inspect_store` report."""

    path: str
    complete: bool
    schema_version: int
    num_sequences: int
    num_shards: int
    shards_done: int
    top_k: int
    vocab_size: int
    has_rollout_logprobs: bool
    prompt_tokens: int
    response_tokens: int
    nbytes: int
    provenance: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # missing markers / shard directories / files (inspect)
    teacher_signal: str = TEACHER_LOGPROBS  # StoreMeta.teacher_signal

    @classmethod
    def of(cls, path: Path, meta: StoreMeta, shards_done: int, tokens: tuple[int, int] | None = None,
           problems: list[str] | None = None) -> "StoreSummary":
        """``tokens``: (prompt, response) tokens, by default the finalizer's counts in ``meta``."""
        prompt, response = tokens or (int(meta.prompt_tokens or 0), int(meta.response_tokens or 0))
        return cls(path=str(path), complete=meta.complete and not problems, schema_version=meta.schema_version,
                   num_sequences=meta.num_sequences, num_shards=meta.num_shards, shards_done=shards_done, top_k=meta.top_k,
                   vocab_size=meta.vocab_size, has_rollout_logprobs=meta.has_rollout_logprobs, prompt_tokens=prompt,
                   response_tokens=response, nbytes=store_nbytes(path), provenance=meta.provenance.to_dict(),
                   problems=problems or [], teacher_signal=meta.teacher_signal)

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(1, self.response_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "bytes_per_token": round(self.bytes_per_token, 3)}


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    complete: bool = False
    num_shards: int = 0
    shards_checked: int = 0
    chunks_checked: int = 0
    tokens_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "first_problem": self.first_problem}


def verify_store(path: str | os.PathLike, *, require_complete: bool = True, progress: bool = False) -> VerifyReport:
    """Read and check every shard of the store at ``path``; see the module docstring."""
    import zarr

    path = Path(path)
    report = VerifyReport(path=str(path))
    try:
        meta = read_meta(path)
    except LopdError as exc:
        report.problem(str(exc))
        return report
    report.complete, report.num_shards = meta.complete, meta.num_shards
    if require_complete and not meta.complete:
        done = len(done_shards(path, meta))
        report.problem(f"store is not complete ({done} of {meta.num_shards} shards have done markers; not finalized)")
    shards = range(meta.num_shards)
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify shards", unit="shard")
    per_seq_all: dict[str, list[np.ndarray]] = {name: [] for name in PER_SEQUENCE}
    for s in shards:
        try:
            per_seq = _verify_shard(path, meta, s, report)
        except LopdError as exc:
            report.problem(f"shard {s}: {exc}")
            continue
        except Exception as exc:  # anything unexpected in a damaged shard is a problem, not a crash
            report.problem(f"shard {s}: unreadable ({type(exc).__name__}: {exc})")
            continue
        report.shards_checked += 1
        for name in PER_SEQUENCE:
            per_seq_all[name].append(per_seq[name])
    if meta.complete and report.shards_checked == meta.num_shards:
        try:
            group = zarr.open_group(path / SEQUENCES_DIR, mode="r")
            for name in PER_SEQUENCE:
                stored = read_small_array(group, name, f"{path}/{SEQUENCES_DIR}")
                expect = np.concatenate(per_seq_all[name])
                if stored.shape != expect.shape or not np.array_equal(stored.astype(expect.dtype), expect):
                    report.problem(f"{SEQUENCES_DIR}/{name} differs from the shards' {name}")
        except Exception as exc:
            report.problem(f"{SEQUENCES_DIR}/: unreadable ({type(exc).__name__}: {exc})")
    return report


def require_valid_store(path: str | os.PathLike) -> VerifyReport:
    """`verify_store`, raising a one-line ArtifactError for an incomplete or damaged store."""
    report = verify_store(path)
    if not report.ok:
        more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise ArtifactError(f"{path}: teacher store does not verify: {report.first_problem}{more}",
                            "rerun the scoring stage (it resumes) or `lopd score --finalize`")
    return report


def _verify_shard(path: Path, meta: StoreMeta, s: int, report: VerifyReport) -> dict[str, np.ndarray]:
    import zarr

    marker = ShardMarker.read(marker_path(path, s))
    if marker is None:
        raise LopdError("no done marker (not written, or its writer was killed)")
    base = shard_dir(path, s)
    mismatch = size_mismatch(base, marker)
    if mismatch is not None:
        rel, actual, size = mismatch
        if actual is None:
            raise LopdError(f"file {rel} is missing")
        raise LopdError(f"array {rel.split('/')[0]!r}: file {rel} is {actual} bytes, marker says {size} (truncated?)")
    rng = shard_range(meta, s)
    group = zarr.open_group(base, mode="r")
    per_seq = {name: read_small_array(group, name, f"shard {s}") for name in PER_SEQUENCE}
    if len(per_seq["prompt_lens"]) != len(rng):
        raise LopdError(f"holds {len(per_seq['prompt_lens'])} sequences, expected {len(rng)}")
    plens, rlens = per_seq["prompt_lens"].astype(np.int64), per_seq["response_lens"].astype(np.int64)
    if int(plens.sum()) != marker.prompt_tokens or int(rlens.sum()) != marker.response_tokens:
        raise LopdError("token counts differ from the done marker")
    real, rslots = aligned_positions(rlens, meta.chunk_tokens)  # real positions: without the padding
    names = token_array_names(meta)
    data = {}
    for name in names:
        arr = ShardedArray(base / name, f"array {name!r} of shard {s}")
        expect_len = int(plens.sum() if name == "prompt_ids" else rslots)
        if arr.shape[-1] != expect_len:
            raise LopdError(f"array {name!r} has {arr.shape[-1]} positions, the lengths say {expect_len}")
        try:
            data[name] = arr.read_all()
        finally:
            arr.close()
        report.chunks_checked += -(-expect_len // arr.chunk_len)
    for name in names[1:]:
        data[name] = np.ascontiguousarray(data[name][..., real])
    for name in ("prompt_ids", "response_ids"):
        ids = data[name]
        if ids.size and (ids.min() < 0 or ids.max() >= meta.vocab_size):
            raise LopdError(f"array {name!r} holds ids outside the vocabulary")
    for name in ("teacher_logprobs", "rollout_logprobs"):
        if name in data and not np.isfinite(data[name]).all():
            raise LopdError(f"array {name!r} holds non-finite log-probs")
        corrected_score = name == "teacher_logprobs" and meta.residualized  # may be above 0 (schema.TEACHER_SIGNALS)
        if name in data and not corrected_score and (data[name] > 0).any():
            raise LopdError(f"array {name!r} holds positive log-probs")
    if meta.top_k:
        vocabulary = read_small_array(group, TOPK_VOCABULARY, f"shard {s}")
        codes = data["topk_ids"][1:]
        if codes.size and (codes.min() < 0 or codes.max() >= len(vocabulary)):
            raise LopdError(f"array 'topk_ids' indexes past the {len(vocabulary)} entries of {TOPK_VOCABULARY!r}")
        ids, lp = decode_topk_inplace(data["response_ids"], data["teacher_logprobs"], data["topk_ids"],
                                      data["topk_logprobs"], vocabulary)
        if ids.size and (ids.min() < 0 or ids.max() >= meta.vocab_size):
            raise LopdError("array 'topk_ids' holds ids outside the vocabulary")
        if not np.isfinite(lp).all():
            raise LopdError("array 'topk_logprobs' decodes to non-finite log-probs")
    pstart = np.concatenate([[0], np.cumsum(plens)])
    rbound = np.concatenate([[0], np.cumsum(rlens)])
    for j, stored in enumerate(per_seq["content_hash"]):
        actual = content_hash(data["prompt_ids"][pstart[j]:pstart[j + 1]], data["response_ids"][rbound[j]:rbound[j + 1]])
        if actual != uint64_to_hash(stored):
            raise LopdError(f"sequence {rng.start + j}: content hash {actual} differs from the stored {uint64_to_hash(stored)}")
    report.tokens_checked += int(rlens.sum())
    return per_seq


def _crc_ok(data: bytes, start: int, stop: int) -> bool:
    """The 4 little-endian bytes at ``stop`` are the crc32c of ``data[start:stop]``."""
    import google_crc32c

    return google_crc32c.value(data[start:stop]) == int.from_bytes(data[stop:stop + 4], "little")


def _check_array_checksums(array_dir: Path, label: str) -> tuple[int, int]:
    """crc32c of every shard index and inner chunk (sharded) or chunk (crc32c codec) of one array:
    (chunks checked, bytes read). Raises `ChecksumError` naming the file."""
    fix = "the store is damaged: delete that shard's marker, rerun its writer and finalize again"
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        codecs = meta.get("codecs") or []
    except (OSError, ValueError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"{label}: unreadable array metadata {array_dir / 'zarr.json'} ({type(exc).__name__})", fix) from None
    files = sorted(p for p in (array_dir / "c").rglob("*") if p.is_file()) if (array_dir / "c").is_dir() else []
    chunks = nbytes = 0
    if codecs and codecs[0].get("name") == "sharding_indexed":
        cfg = codecs[0]["configuration"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        per_shard = math.prod(o // c for o, c in zip(outer, cfg["chunk_shape"]))
        index_nbytes = 16 * per_shard + 4
        for f in files:
            data = f.read_bytes()
            nbytes += len(data)
            end = len(data) - index_nbytes
            if end < 0 or not _crc_ok(data, end, len(data) - 4):
                raise ChecksumError(f"{label}: checksum error in the shard index of {f} (truncated or corrupted)", fix)
            index = np.frombuffer(data[end:-4], dtype="<u8").reshape(-1, 2)
            for i, (offset, size) in enumerate(index.tolist()):
                if offset == 2**64 - 1:
                    continue  # an empty chunk
                if size < 4 or offset + size > end:
                    raise ChecksumError(f"{label}: inner chunk {i} of {f} lies outside the file", fix)
                if not _crc_ok(data, offset, offset + size - 4):
                    raise ChecksumError(f"{label}: checksum error in inner chunk {i} of {f}", fix)
                chunks += 1
    elif codecs and codecs[-1].get("name") == "crc32c":
        for f in files:
            data = f.read_bytes()
            nbytes += len(data)
            if len(data) < 4 or not _crc_ok(data, 0, len(data) - 4):
                raise ChecksumError(f"{label}: checksum error in chunk {f}", fix)
            chunks += 1
    return chunks, nbytes


@dataclass
class FileCheckStats:
    """What `check_store_files` checked."""

    path: str
    shards: int = 0
    files: int = 0
    chunks: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def check_store_files(path: str | os.PathLike, *, checksums: bool = True, require_complete: bool = True) -> FileCheckStats:
    """Fast check before training: raises `ArtifactError` (`ChecksumError` for a checksum) with the first problem.

    Checks: root metadata readable, ``complete`` set (unless ``require_complete=False``);
    every shard's done marker, shard directory and array metadata present and every data
    file with the size its marker records; for a complete store, ``sequences/``. With
    ``checksums=True`` every file is read once and every shard index, inner chunk and
    per-sequence chunk is matched against its crc32c (nothing is decoded). What it does
    not check (`verify_store` does, decoding everything): ids within the vocabulary,
    finite log-probs, content hashes, lengths against the markers.
    """
    started = time.perf_counter()
    path = Path(path)
    meta = read_meta(path)
    stats = FileCheckStats(path=str(path))
    if require_complete and not meta.complete:
        done = len(done_shards(path, meta))
        raise ArtifactError(f"teacher store {path} is not complete ({done} of {meta.num_shards} shards done, not finalized)",
                            "finish the scoring workers, then run `lopd store finalize`")
    for s in range(meta.num_shards):
        problem, marker = shard_problem(path, meta, s, marker_required=True)
        if problem is not None:
            raise ArtifactError(f"teacher store {path}: {problem}",
                                "delete that shard's marker if present, rerun its writer (`lopd score` resumes) and finalize again")
        stats.shards += 1
        stats.files += len(marker.files)
        if checksums:
            base = shard_dir(path, s)
            for name in shard_array_names(meta):
                c, b = _check_array_checksums(base / name, f"teacher store {path}: array {name!r} of shard {s}")
                stats.chunks += c
                stats.bytes_read += b
    if meta.complete:
        for name in PER_SEQUENCE:
            array_dir = path / SEQUENCES_DIR / name
            if not (array_dir / "zarr.json").is_file():
                raise ArtifactError(f"teacher store {path}: {SEQUENCES_DIR}/{name} is missing",
                                    "run `lopd store finalize` again")
            if checksums:
                c, b = _check_array_checksums(array_dir, f"teacher store {path}: {SEQUENCES_DIR}/{name}")
                stats.chunks += c
                stats.bytes_read += b
    stats.seconds = time.perf_counter() - started
    return stats


def inspect_store(path: str | os.PathLike) -> StoreSummary:
    """Summary of a store, complete or not (token counts of an incomplete one: done shards).

    Cheap checks only (no data read): every done marker, shard directory and data file with
    its marker's size; what is missing is listed in ``problems`` and a finalized store with
    problems is reported as not complete.
    """
    path = Path(path)
    meta = read_meta(path)
    problems, markers = [], []
    for s in range(meta.num_shards):
        problem, marker = shard_problem(path, meta, s, marker_required=meta.complete)
        if problem is not None:
            problems.append(problem)
        if marker is not None:
            markers.append(marker)
    if meta.complete and not (path / SEQUENCES_DIR / "zarr.json").is_file():
        problems.append(f"{SEQUENCES_DIR}/ is missing")
    tokens = None if meta.complete else (sum(m.prompt_tokens for m in markers), sum(m.response_tokens for m in markers))
    done = sum(1 for m in markers if shard_dir(path, m.shard).is_dir())
    return StoreSummary.of(path, meta, done, tokens, problems)


__all__ = ["FileCheckStats", "StoreSummary", "VerifyReport", "check_store_files", "inspect_store", "require_valid_store", "verify_store"]
