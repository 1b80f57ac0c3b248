"""Finalizing a teacher store (once, by one process, after every writer has exited): the
shards checked through `verify`, then the root ``zarr.json`` published with ``complete``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lopd.errors import ArtifactError
from megatron_lopd.runtime.files import LOCK_NAME, OutputLock, atomic_write
from megatron_lopd.store.format import read_small_array, write_small_array
from megatron_lopd.store.layout import PER_SEQUENCE, done_shards, read_meta, root_json, shard_dir, store_nbytes
from megatron_lopd.store.schema import MARKERS_DIR, SEQUENCES_DIR, SHARDS_DIR, StoreMeta
from megatron_lopd.store.verify import StoreSummary, check_store_files, verify_store


def _consolidated(path: Path) -> dict[str, Any]:
    """zarr v3 inline consolidated metadata: every node's zarr.json below the root."""
    out: dict[str, Any] = {}
    for sub in (SHARDS_DIR, SEQUENCES_DIR):
        for meta_file in sorted((path / sub).rglob("zarr.json")):
            rel = meta_file.parent.relative_to(path).as_posix()
            if "/." in f"/{rel}":
                continue  # temporaries
            out[rel] = json.loads(meta_file.read_text())
    return out


def finalize_store(path: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> StoreSummary:
    """Check every shard, gather per-sequence arrays, consolidate metadata, set ``complete``.

    Run once, by one process, after all writers have exited. Idempotent: finalizing a
    complete store re-checks it and returns its summary. ``verify=True`` reads every
    chunk of every shard (checksums, content hashes) before publishing ``complete``;
    without it every marker, shard directory and file size is still checked. Holds the
    store's lock: a second concurrent finalizer gets `LockedError` naming the first.
    """
    path = Path(path)
    read_meta(path)  # a clear error for a path that is not a store, before any lock file is written
    with OutputLock(path / LOCK_NAME, f"teacher store {path} (finalize)"):
        return _finalize_locked(path, verify=verify, progress=progress)


def _finalize_locked(path: Path, *, verify: bool, progress: bool) -> StoreSummary:
    import zarr

    meta = read_meta(path)
    if meta.complete:
        return _finalized_summary(path, meta, verify=verify, progress=progress)
    done = set(done_shards(path, meta))
    missing = [s for s in range(meta.num_shards) if s not in done]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ArtifactError(
            f"teacher store {path}: {len(missing)} of {meta.num_shards} shards have no done marker ({shown})",
            "rerun the scoring workers (they write only missing shards), then finalize",
        )
    if verify:
        report = verify_store(path, require_complete=False, progress=progress)
        if not report.ok:
            raise ArtifactError(f"teacher store {path}: {report.first_problem}",
                                "delete the named shard's marker, rerun its writer, then finalize again")
    else:
        check_store_files(path, checksums=False, require_complete=False)
    for stale in (path / SHARDS_DIR).glob(".tmp-*"):  # left by killed writers; all writers are done
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (path / MARKERS_DIR).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for lock_path in (path / MARKERS_DIR).glob("*.lock"):  # of writers killed after their marker
        lock = OutputLock(lock_path, "teacher store shard")
        holder = lock.read_holder()
        if holder is not None and lock.stale_reason(holder) is not None:
            lock_path.unlink(missing_ok=True)

    gathered: dict[str, list[np.ndarray]] = {}
    for s in range(meta.num_shards):
        group = zarr.open_group(shard_dir(path, s), mode="r")
        for name in PER_SEQUENCE:
            gathered.setdefault(name, []).append(read_small_array(group, name, f"{path}: shard {s}"))
    seq_dir = path / SEQUENCES_DIR
    if seq_dir.exists():
        shutil.rmtree(seq_dir)  # from a finalize that crashed before publishing
    group = zarr.open_group(seq_dir, mode="w")
    for name, parts in gathered.items():
        values = np.concatenate(parts)
        if name == "prompt_id":
            values = values.astype(object)
        write_small_array(group, name, values, clevel=meta.clevel, chunk=1 << 16)
    meta.complete = True
    meta.prompt_tokens = int(np.concatenate(gathered["prompt_lens"]).sum(dtype=np.int64))
    meta.response_tokens = int(np.concatenate(gathered["response_lens"]).sum(dtype=np.int64))
    meta.finalized_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta.nbytes = store_nbytes(path)
    # The one atomic step that makes the store complete.
    atomic_write(path / "zarr.json", root_json(meta, _consolidated(path)), fsync=True)
    return _finalized_summary(path, meta, verify=False)


def _finalized_summary(path: Path, meta: StoreMeta, *, verify: bool, progress: bool = False) -> StoreSummary:
    if verify:
        report = verify_store(path, progress=progress)
        if not report.ok:
            raise ArtifactError(f"teacher store {path}: {report.first_problem}", "rescore the named shard")
    return StoreSummary.of(path, meta, meta.num_shards)
