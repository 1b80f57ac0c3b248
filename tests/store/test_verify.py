"""Refusals: incomplete, unknown schema, flipped byte, truncated shard, missing shard,
missing marker; `verify_store` reports each as its first problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.store import ChecksumError, TeacherStore, finalize_store, inspect_store, verify_store
from megatron_lopd.store.format import ShardedArray
from megatron_lopd.store.schema import ROOT_ATTR

from .conftest import make_store

SPS = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    path, records = make_store(base / "s.zarr", n=40, k=4, sps=SPS, finalize=False)
    shutil.copytree(path, base / "unfinalized.zarr")
    finalize_store(path)
    return path, base / "unfinalized.zarr", records


@pytest.fixture()
def store_copy(pristine, tmp_path):
    dst = tmp_path / "s.zarr"
    shutil.copytree(pristine[0], dst)
    return dst


def _chunk_offset(shard_file, num_chunks, chunk=0):
    raw = shard_file.read_bytes()
    index = np.frombuffer(raw[-(16 * num_chunks + 4):-4], dtype="<u8").reshape(-1, 2)
    return int(index[chunk, 0])


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_good_store_verifies(pristine):
    report = verify_store(pristine[0])
    assert report.ok and report.problems == [] and report.shards_checked == 5
    assert report.tokens_checked == sum(len(r.response_ids) for r in pristine[2])


def test_incomplete_store_is_refused(pristine):
    path = pristine[1]
    with pytest.raises(ArtifactError, match=r"incomplete \(5 of 5 shards done, not finalized\)"):
        TeacherStore.open(path)
    report = verify_store(path)
    assert not report.ok and "not complete" in report.first_problem
    assert verify_store(path, require_complete=False).ok
    summary = inspect_store(path)
    assert not summary.complete and summary.shards_done == 5


def test_unknown_schema_version_is_refused(store_copy):
    root = store_copy / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"][ROOT_ATTR]["schema_version"] = 99
    root.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="unknown teacher store schema version 99"):
        TeacherStore.open(store_copy)
    assert "schema version 99" in verify_store(store_copy).first_problem


def test_flipped_byte_in_a_chunk_raises_checksum_error_naming_array_and_shard(store_copy):
    shard_file = store_copy / "shards" / "000001" / "topk_ids" / "c" / "0" / "0"
    store = TeacherStore.open(store_copy)
    arr_chunks = store._shard_arrays(1)["topk_ids"].num_chunks
    store.close()
    _flip(shard_file, _chunk_offset(shard_file, arr_chunks) + 20)
    store = TeacherStore.open(store_copy)  # sizes unchanged: opens
    store[0]  # other shards still read
    with pytest.raises(ChecksumError, match=r"array 'topk_ids' of shard 1: checksum error in inner chunk 0"):
        store[SPS]  # first sequence of shard 1 starts in chunk 0
    report = verify_store(store_copy)
    assert not report.ok and report.first_problem.startswith("shard 1:")
    assert "'topk_ids' of shard 1" in report.first_problem and "checksum" in report.first_problem


def test_finalize_refuses_a_corrupted_shard(pristine, tmp_path):
    path = tmp_path / "u.zarr"
    shutil.copytree(pristine[1], path)
    shard_file = path / "shards" / "000001" / "prompt_ids" / "c" / "0"
    _flip(shard_file, 5)
    with pytest.raises(ArtifactError, match="shard 1: .*'prompt_ids' of shard 1"):
        finalize_store(path)
    assert not inspect_store(path).complete


def test_flipped_byte_in_the_shard_index(store_copy):
    shard_file = store_copy / "shards" / "000002" / "teacher_logprobs" / "c" / "0"
    _flip(shard_file, shard_file.stat().st_size - 9)
    store = TeacherStore.open(store_copy)
    with pytest.raises(ChecksumError, match=r"array 'teacher_logprobs' of shard 2: checksum error in the shard index"):
        store[2 * SPS + 1]


def test_truncated_shard_file(store_copy):
    shard_file = store_copy / "shards" / "000003" / "response_ids" / "c" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:-50])
    with pytest.raises(ArtifactError, match=r"array 'response_ids' of shard 3 is \d+ bytes, its marker says \d+"):
        TeacherStore.open(store_copy)
    report = verify_store(store_copy)
    assert "shard 3" in report.first_problem and "response_ids" in report.first_problem
    # Without the marker's size check, the chunk reader itself detects the truncation.
    with pytest.raises(ChecksumError, match="array 'response_ids' of shard 3: .*(truncated|checksum)"):
        ShardedArray(shard_file.parents[1], "array 'response_ids' of shard 3").read_all()


def test_missing_shard_or_marker_in_a_complete_store(store_copy):
    shutil.rmtree(store_copy / "shards" / "000002")
    with pytest.raises(ArtifactError, match="shard 2 file .* is missing"):
        TeacherStore.open(store_copy)
    assert verify_store(store_copy).first_problem.startswith("shard 2:")
    (store_copy / "markers" / "000004.json").unlink()
    report = verify_store(store_copy)
    assert [p.split(":")[0] for p in report.problems] == ["shard 2", "shard 4"]


def test_missing_marker_only(store_copy):
    (store_copy / "markers" / "000000.json").unlink()
    with pytest.raises(ArtifactError, match="shard 0 has no done marker although the store is complete"):
        TeacherStore.open(store_copy)


def test_not_a_store(tmp_path):
    with pytest.raises(ArtifactError, match="not a teacher store"):
        TeacherStore.open(tmp_path)
    assert "not a teacher store" in verify_store(tmp_path / "nothing").first_problem
