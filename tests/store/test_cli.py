"""`lopd store inspect|verify|finalize` through the real console entry, in subprocesses."""

from __future__ import annotations

import json
import shutil

from .conftest import PROV, lopd, make_store


def test_inspect_verify_finalize(tmp_path):
    path, records = make_store(tmp_path / "s.zarr", n=24, k=4, sps=8, finalize=False)
    res = lopd("store", "inspect", str(path), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["complete"] is False and info["shards_done"] == 3 and info["num_shards"] == 3
    res = lopd("store", "verify", str(path))
    assert res.returncode == 1 and "FAILED" in res.stdout and "not complete" in res.stdout

    res = lopd("store", "finalize", str(path))
    assert res.returncode == 0, res.stderr
    res = lopd("store", "inspect", str(path), "--json")
    info = json.loads(res.stdout)
    tokens = sum(len(r.response_ids) for r in records)
    assert info["complete"] is True and info["num_sequences"] == 24 and info["top_k"] == 4
    assert info["response_tokens"] == tokens
    assert info["prompt_tokens"] == sum(len(r.prompt_ids) for r in records)
    assert abs(info["bytes_per_token"] - info["nbytes"] / tokens) < 1e-2
    assert info["provenance"]["teacher_fingerprint"] == PROV["teacher_fingerprint"]
    res = lopd("store", "inspect", str(path))
    assert res.returncode == 0 and "complete       yes" in res.stdout and "B/response token" in res.stdout
    res = lopd("store", "verify", str(path))
    assert res.returncode == 0 and res.stdout.startswith("OK"), res.stdout + res.stderr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(path, bad)
    shard_file = bad / "shards" / "000002" / "topk_logprobs" / "c" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[30] ^= 0x01
    shard_file.write_bytes(bytes(data))
    res = lopd("store", "verify", str(bad))
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "'topk_logprobs' of shard 2" in res.stdout and "checksum" in res.stdout

    res = lopd("store", "inspect", str(tmp_path / "missing"))
    assert res.returncode == 2 and "not a teacher store" in res.stderr and len(res.stderr.strip().splitlines()) == 1
