"""TeacherStore: random access and batches equal the written records; zarr-python reads the
same bytes; epoch partitions; DataLoader workers; provenance requirements."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from megatron_lopd.errors import ConfigError, ConsistencyError
from megatron_lopd.store import TeacherStore
from megatron_lopd.store.schema import aligned_starts, encode_topk

from .conftest import PROV, make_store

FIELDS = ("prompt_ids", "response_ids", "teacher_logprobs", "topk_ids", "topk_logprobs", "rollout_logprobs")


def _same(rec, src, fields=FIELDS):
    for name in fields:
        got, want = getattr(rec, name), getattr(src, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), name
    assert (rec.prompt_id, rec.sample_index, rec.content_hash) == (src.prompt_id, src.sample_index, src.content_hash)


def test_random_access_and_batches_return_the_written_records(small_store):
    path, records = small_store
    store = TeacherStore.open(path, require={"teacher_fingerprint": PROV["teacher_fingerprint"],
                                             "tokenizer_fingerprint": PROV["tokenizer_fingerprint"],
                                             "scoring_dtype": "float32"})
    assert len(store) == len(records) and store.top_k == 4 and store.has_rollout_logprobs
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(records)):
        rec = store[int(i)]
        _same(rec, records[i])
        assert rec.index == i
    assert store[-1].index == len(records) - 1
    with pytest.raises(IndexError):
        store[len(records)]
    batch = [5, 0, 5, 39, 17]
    assert store.num_threads == 2  # get_batch decodes on 2 threads by default
    for rec, i in zip(store.get_batch(batch), batch):
        _same(rec, records[i])
    serial = TeacherStore.open(path, num_threads=1, cache_bytes=0)
    for rec, i in zip(serial.get_batch(batch), batch):
        _same(rec, records[i])
    prompt_lens, response_lens = store.lengths()
    assert prompt_lens.tolist() == [len(r.prompt_ids) for r in records]
    assert response_lens.tolist() == [len(r.response_ids) for r in records]
    assert store.num_tokens == sum(response_lens) and store.num_prompt_tokens == sum(prompt_lens)
    assert store.content_hashes() == [r.content_hash for r in records]
    assert store.prompt_ids_of([3, 4]) == [records[3].prompt_id, records[4].prompt_id]
    assert store.provenance.teacher_fingerprint == PROV["teacher_fingerprint"]
    assert store.nbytes > 0
    # Top-k rows come back sorted descending, as written.
    rec = store[7]
    assert (np.diff(rec.topk_logprobs.astype(np.float32), axis=1) <= 0).all()
    # Without the top-k arrays (paper loss): the rest is unchanged.
    light = TeacherStore.open(path, load_topk=False)
    rec = light[7]
    assert rec.topk_ids is None and rec.topk_logprobs is None
    _same(rec, records[7], ("prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs"))


def test_zarr_python_reads_the_same_stored_arrays(small_store):
    """An independent reader (zarr-python's own codec pipeline) on every stored array."""
    import zarr

    path, records = small_store
    store = TeacherStore.open(path)
    sps, chunk = store.meta.sequences_per_shard, store.meta.chunk_tokens
    for shard in range(store.meta.num_shards):
        recs = records[shard * sps:(shard + 1) * sps]
        lens = np.array([len(r.response_ids) for r in recs])
        starts = aligned_starts(lens, chunk)
        group = zarr.open_group(path / "shards" / f"{shard:06d}", mode="r")
        assert np.array_equal(group["prompt_ids"][...], np.concatenate([r.prompt_ids for r in recs]))
        ids, codes, vocabulary = encode_topk(np.concatenate([r.response_ids for r in recs]),
                                 np.concatenate([r.teacher_logprobs for r in recs]),
                                 np.concatenate([r.topk_ids for r in recs]),
                                 np.concatenate([r.topk_logprobs for r in recs]))
        offset = 0
        stored = {name: group[name][...] for name in ("response_ids", "teacher_logprobs", "rollout_logprobs",
                                                     "topk_ids", "topk_logprobs")}
        for rec, start, n in zip(recs, starts, lens):
            for name in ("response_ids", "teacher_logprobs", "rollout_logprobs"):
                assert np.array_equal(stored[name][start:start + n], getattr(rec, name)), name
            assert np.array_equal(stored["topk_ids"][:, start:start + n], ids[:, offset:offset + n])
            assert np.array_equal(stored["topk_logprobs"][:, start:start + n], codes[:, offset:offset + n])
            offset += n
        assert np.array_equal(group["topk_vocabulary"][...], vocabulary)
        assert group["content_hash"][...].tolist() == [int(r.content_hash, 16) for r in recs]
        assert group["prompt_id"][...].tolist() == [r.prompt_id for r in recs]


@pytest.mark.parametrize("k, rollout", [(0, False), (8, True)])
def test_store_modes_roundtrip(tmp_path, k, rollout):
    path, records = make_store(tmp_path / "s.zarr", n=21, k=k, sps=5, rollout=rollout, chunk_tokens=32)
    store = TeacherStore.open(path)
    assert store.top_k == k and store.has_rollout_logprobs == rollout
    for i, src in enumerate(records):
        _same(store[i], src)


def test_empty_prompts_and_responses_and_long_sequences(tmp_path):
    """Zero-length prompts/responses are stored; a sequence longer than many chunks needs no spill."""
    from dataclasses import replace

    from megatron_lopd.store import StoreWriter, finalize_store, synthetic_record

    from .conftest import VOCAB, spec

    long_spec = replace(spec(4), response_len=(700, 700), response_len_median=700)
    records = [synthetic_record(i, spec(4)) for i in range(6)]
    records[1] = replace(records[1], prompt_ids=np.zeros(0, np.int32))
    empty = np.zeros(0, np.float32)
    records[2] = replace(records[2], response_ids=np.zeros(0, np.int32), teacher_logprobs=empty,
                         rollout_logprobs=empty, topk_ids=np.zeros((0, 4), np.int32),
                         topk_logprobs=np.zeros((0, 4), np.float16))
    records[4] = synthetic_record(4, long_spec)  # 700 tokens = 11 chunks of 64
    w = StoreWriter.create(tmp_path / "s.zarr", num_sequences=6, top_k=4, vocab_size=VOCAB, provenance=dict(PROV),
                           sequences_per_shard=3, has_rollout_logprobs=True, chunk_tokens=64, fsync=False)
    w.write_shard(0, records[:3])
    w.write_shard(1, records[3:])
    finalize_store(tmp_path / "s.zarr")
    store = TeacherStore.open(tmp_path / "s.zarr")
    for i, src in enumerate(records):
        _same(store[i], src)
    assert len(store[4].response_ids) == 700 and store.lengths()[1][2] == 0


def test_epoch_indices_are_deterministic_disjoint_and_balanced(small_store):
    path, _ = small_store
    store = TeacherStore.open(path)
    n = len(store)  # 40
    for dp_size in (1, 3, 4):
        parts = [store.epoch_indices(seed=7, epoch=2, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        again = [TeacherStore.open(path).epoch_indices(7, 2, r, dp_size) for r in range(dp_size)]
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # same on every process
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // dp_size
        flat = np.concatenate(parts)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert len(flat) == n - n % dp_size and set(flat.tolist()) <= set(range(n))
    e2 = store.epoch_indices(7, 2, 0, 1)
    assert sorted(e2.tolist()) == list(range(n))
    assert not np.array_equal(e2, store.epoch_indices(7, 3, 0, 1))  # reshuffled per epoch
    assert not np.array_equal(e2, store.epoch_indices(8, 2, 0, 1))  # and per seed
    padded = [store.epoch_indices(7, 2, r, 3, drop_last=False) for r in range(3)]
    assert {len(p) for p in padded} == {14} and set(np.concatenate(padded).tolist()) == set(range(n))
    assert np.array_equal(store.epoch_indices(0, 0, 1, 4, shuffle=False), np.arange(1, n, 4))
    with pytest.raises(ConfigError):
        store.epoch_indices(0, 0, 4, 4)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        rec = self.store[i]
        return i, torch.from_numpy(rec.response_ids), torch.from_numpy(np.ascontiguousarray(rec.topk_ids))


def test_dataloader_workers_and_pickle(small_store):
    path, records = small_store
    store = TeacherStore.open(path)
    store[0]  # open files and fill the cache before forking / pickling
    clone = pickle.loads(pickle.dumps(store))
    _same(clone[3], records[3])
    loader = torch.utils.data.DataLoader(_Dataset(store), batch_size=None, num_workers=2,
                                         sampler=store.epoch_indices(1, 0, 0, 1).tolist())
    seen = set()
    for i, response, topk in loader:
        assert torch.equal(response, torch.from_numpy(records[i].response_ids))
        assert torch.equal(topk, torch.from_numpy(records[i].topk_ids))
        seen.add(int(i))
    assert seen == set(range(len(records)))


@pytest.mark.slow
def test_dataloader_spawn_workers(small_store):
    """Spawned workers receive the store by pickle and reopen its files."""
    path, records = small_store
    store = TeacherStore.open(path)
    loader = torch.utils.data.DataLoader(_Dataset(store), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn", sampler=[4, 9])
    got = [(int(i), r) for i, r, _ in loader]
    assert [i for i, _ in got] == [4, 9]
    assert all(torch.equal(r, torch.from_numpy(records[i].response_ids)) for i, r in got)


def test_provenance_requirements(small_store):
    path, _ = small_store
    with pytest.raises(ConsistencyError) as err:
        TeacherStore.open(path, require={"teacher_fingerprint": "model-other"})
    assert "'model-teacher'" in str(err.value) and "'model-other'" in str(err.value)
    with pytest.raises(ConsistencyError, match="tokenizer_fingerprint is 'tok-abc' but 'tok-xyz'"):
        TeacherStore.open(path, require={"teacher_fingerprint": "model-teacher", "tokenizer_fingerprint": "tok-xyz"})
    with pytest.raises(ConfigError, match="no field 'teacher'"):
        TeacherStore.open(path, require={"teacher": "x"})
