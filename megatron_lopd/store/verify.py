"""Whole-store checks (`verify_store`) and a summary for humans (`inspect_store`).

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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lopd.errors import LopdError
from megatron_lopd.store.format import ShardedArray, read_small_array
from megatron_lopd.store.schema import (
    SEQUENCES_DIR,
    SHARDS_DIR,
    TOPK_VOCABULARY,
    aligned_positions,
    content_hash,
    decode_topk_inplace,
    uint64_to_hash,
)
from megatron_lopd.store.writer import (
    StoreSummary,
    StoreWriter,
    read_meta,
    shard_name,
    store_nbytes,
)

_PER_SEQ = ("prompt_lens", "response_lens", "sample_index", "content_hash", "prompt_id")


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
    writer = StoreWriter(path, meta)
    if require_complete and not meta.complete:
        done = len(writer.done_shards())
        report.problem(f"store is not complete ({done} of {meta.num_shards} shards have done markers; not finalized)")
    shards = range(meta.num_shards)
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify shards", unit="shard")
    per_seq_all: dict[str, list[np.ndarray]] = {name: [] for name in _PER_SEQ}
    for s in shards:
        try:
            per_seq = _verify_shard(path, writer, s, report)
        except LopdError as exc:
            report.problem(f"shard {s}: {exc}")
            continue
        except Exception as exc:  # anything unexpected in a damaged shard is a problem, not a crash
            report.problem(f"shard {s}: unreadable ({type(exc).__name__}: {exc})")
            continue
        report.shards_checked += 1
        for name in _PER_SEQ:
            per_seq_all[name].append(per_seq[name])
    if meta.complete and report.shards_checked == meta.num_shards:
        try:
            group = zarr.open_group(path / SEQUENCES_DIR, mode="r")
            for name in _PER_SEQ:
                stored = read_small_array(group, name, f"{path}/{SEQUENCES_DIR}")
                expect = np.concatenate(per_seq_all[name])
                if stored.shape != expect.shape or not np.array_equal(stored.astype(expect.dtype), expect):
                    report.problem(f"{SEQUENCES_DIR}/{name} differs from the shards' {name}")
        except Exception as exc:
            report.problem(f"{SEQUENCES_DIR}/: unreadable ({type(exc).__name__}: {exc})")
    return report


def _verify_shard(path: Path, writer: StoreWriter, s: int, report: VerifyReport) -> dict[str, np.ndarray]:
    import zarr

    meta = writer.meta
    marker = writer.marker(s)
    if marker is None:
        raise LopdError("no done marker (not written, or its writer was killed)")
    base = path / SHARDS_DIR / shard_name(s)
    for rel, size in marker.files.items():
        f = base / rel
        if not f.exists():
            raise LopdError(f"file {rel} is missing")
        if f.stat().st_size != size:
            raise LopdError(f"array {rel.split('/')[0]!r}: file {rel} is {f.stat().st_size} bytes, marker says {size} (truncated?)")
    rng = writer.shard_range(s)
    group = zarr.open_group(base, mode="r")
    per_seq = {name: read_small_array(group, name, f"shard {s}") for name in _PER_SEQ}
    if len(per_seq["prompt_lens"]) != len(rng):
        raise LopdError(f"holds {len(per_seq['prompt_lens'])} sequences, expected {len(rng)}")
    plens, rlens = per_seq["prompt_lens"].astype(np.int64), per_seq["response_lens"].astype(np.int64)
    if int(plens.sum()) != marker.prompt_tokens or int(rlens.sum()) != marker.response_tokens:
        raise LopdError("token counts differ from the done marker")
    real, rslots = aligned_positions(rlens, meta.chunk_tokens)  # real positions: without the padding
    names = ["prompt_ids", "response_ids", "teacher_logprobs"]
    names += ["rollout_logprobs"] if meta.has_rollout_logprobs else []
    names += ["topk_ids", "topk_logprobs"] if meta.top_k else []
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
        if name in data and not (np.isfinite(data[name]).all() and (data[name] <= 0).all()):
            raise LopdError(f"array {name!r} holds non-finite or positive log-probs")
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


def inspect_store(path: str | os.PathLike) -> StoreSummary:
    """Summary of a store, complete or not (token counts of an incomplete one: done shards)."""
    path = Path(path)
    meta = read_meta(path)
    writer = StoreWriter(path, meta)
    if meta.complete:
        prompt_tokens, response_tokens, done = int(meta.prompt_tokens or 0), int(meta.response_tokens or 0), meta.num_shards
    else:
        markers = [m for m in (writer.marker(s) for s in range(meta.num_shards)) if m is not None]
        prompt_tokens = sum(m.prompt_tokens for m in markers)
        response_tokens = sum(m.response_tokens for m in markers)
        done = len(markers)
    return StoreSummary(
        path=str(path), complete=meta.complete, schema_version=meta.schema_version,
        num_sequences=meta.num_sequences, num_shards=meta.num_shards, shards_done=done, top_k=meta.top_k,
        vocab_size=meta.vocab_size, has_rollout_logprobs=meta.has_rollout_logprobs, prompt_tokens=prompt_tokens,
        response_tokens=response_tokens, nbytes=store_nbytes(path), provenance=meta.provenance.to_dict(),
    )


__all__ = ["VerifyReport", "verify_store", "inspect_store"]
