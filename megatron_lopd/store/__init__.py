"""The teacher store: a sharded, checksummed zarr v3 store of teacher scores (DESIGN section 1, step 4).

Write (scoring workers, then one finalizer)::

    from megatron_lopd.store import StoreWriter, StoreProvenance, SequenceRecord, finalize_store
    w = StoreWriter.create(path, num_sequences=N, top_k=16, vocab_size=V, provenance=prov,
                           has_rollout_logprobs=True)
    for shard in w.pending_shards(worker=rank, num_workers=world):
        w.write_shard(shard, [SequenceRecord(...) for i in w.shard_range(shard)])
    finalize_store(path)

Read (trainer, notebooks)::

    from megatron_lopd.store import TeacherStore
    store = TeacherStore.open(path, require={"teacher_fingerprint": fp})
    rec = store[0]; batch = store.get_batch(store.epoch_indices(seed, epoch, rank, world)[:32])

Check: `verify_store(path).ok` (decodes everything), `check_store_files(path)` (fast: markers,
files, sizes, crc32c of every chunk; raises on the first problem; run it before training),
`inspect_store(path)`, or ``lopd store verify|inspect PATH``.
The schema and layout are documented in `megatron_lopd.store.schema` (paths and markers:
`store.layout`, which every other module reads through); the store knows nothing of
models or training.
"""

from megatron_lopd.store.finalize import finalize_store
from megatron_lopd.store.format import ChecksumError
from megatron_lopd.store.layout import ShardMarker
from megatron_lopd.store.reader import TeacherStore, check_provenance
from megatron_lopd.store.schema import SCHEMA_VERSION, RecordError, SequenceRecord, StoreMeta, StoreProvenance, content_hash
from megatron_lopd.store.synthetic import SyntheticSpec, synthetic_record, synthetic_records
from megatron_lopd.store.verify import (FileCheckStats, StoreSummary, VerifyReport, check_store_files, inspect_store,
                                        require_valid_store, verify_store)
from megatron_lopd.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "ChecksumError",
    "FileCheckStats",
    "RecordError",
    "SequenceRecord",
    "ShardMarker",
    "StoreMeta",
    "StoreProvenance",
    "StoreSummary",
    "StoreWriter",
    "SyntheticSpec",
    "TeacherStore",
    "VerifyReport",
    "check_provenance",
    "check_store_files",
    "content_hash",
    "finalize_store",
    "inspect_store",
    "synthetic_record",
    "synthetic_records",
    "require_valid_store",
    "verify_store",
]
