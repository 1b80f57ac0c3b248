"""The rollout artifact format: round trip, chunk ownership, resume rules, completeness and integrity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_lopd.errors import ArtifactError
from megatron_lopd.artifacts import ArtifactWriter, RolloutArtifact, RolloutRecord


def _plan(num_prompts=5, n=2, chunk_size=2, has_logprobs=True, temperature=0.7):
    return {
        "kind": "rollouts",
        "producer": {"generator_fingerprint": "model-g", "tokenizer_fingerprint": "tok-t", "chat_template": "T",
                     "model_path": "/somewhere"},
        "inputs": {"prompts_fingerprint": "prompts-p", "num_prompts": num_prompts},
        "params": {"temperature": temperature},
        "layout": {"num_prompts": num_prompts, "n": n, "chunk_size": chunk_size, "has_logprobs": has_logprobs},
    }


def _records(start, stop, n, rng):
    out = []
    for p in range(start, stop):
        prompt = rng.integers(0, 100, size=p + 1).astype(np.int32)
        for j in range(n):
            resp = rng.integers(0, 100, size=int(rng.integers(1, 9))).astype(np.int32)
            out.append(RolloutRecord(prompt_id=f"id-{p}", sample_index=j, prompt_ids=prompt, response_ids=resp,
                                     finish_reason="stop" if j % 2 else "length", text=f"résumé {p}/{j}",
                                     logprobs=-rng.random(len(resp)).astype(np.float32), prompt_index=p))
    return out


def _write_all(path, plan, order=None, seed=0):
    w = ArtifactWriter.create(path, plan)
    chunks = order if order is not None else w.pending_chunks()
    for c in chunks:
        start, stop = w.ranges[c]
        w.write_chunk(c, _records(start, stop, w.n, np.random.default_rng(seed + c)))
    return w


def test_round_trip_order_and_fields(tmp_path):
    plan = _plan()
    w = _write_all(tmp_path / "a", plan)
    art = w.finalize()
    assert len(art) == 10 and art.n == 2 and art.num_prompts == 5
    expected = [r for c in range(3) for r in _records(*w.ranges[c], 2, np.random.default_rng(c))]
    for i, (got, want) in enumerate(zip(art, expected)):
        assert (got.prompt_index, got.sample_index) == (i // 2, i % 2)
        assert got.prompt_id == want.prompt_id and got.text == want.text and got.finish_reason == want.finish_reason
        np.testing.assert_array_equal(got.prompt_ids, want.prompt_ids)
        np.testing.assert_array_equal(got.response_ids, want.response_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
    assert art[-1].prompt_index == 4
    prompt_lens, response_lens = art.lengths()
    np.testing.assert_array_equal(prompt_lens, [len(r.prompt_ids) for r in expected])
    np.testing.assert_array_equal(response_lens, [len(r.response_ids) for r in expected])
    assert art.generator_fingerprint == "model-g" and art.tokenizer_fingerprint == "tok-t"


def test_chunk_ownership_and_order_independence(tmp_path):
    w = ArtifactWriter.create(tmp_path / "a", _plan(num_prompts=7, chunk_size=2))
    assert [w.pending_chunks(i, 3) for i in range(3)] == [[0, 3], [1], [2]]
    # Written in another order by "other processes": same bytes, same fingerprint.
    a = _write_all(tmp_path / "a", _plan(num_prompts=7, chunk_size=2), order=[3, 1, 0, 2]).finalize()
    b = _write_all(tmp_path / "b", _plan(num_prompts=7, chunk_size=2)).finalize()
    assert a.fingerprint == b.fingerprint


def test_incomplete_and_resume_rules(tmp_path):
    path = tmp_path / "a"
    w = _write_all(path, _plan(), order=[0])
    with pytest.raises(ArtifactError, match="incomplete rollout artifact"):
        RolloutArtifact.open(path)
    with pytest.raises(ArtifactError, match="2 of 3 chunks not generated"):
        w.finalize()
    assert ArtifactWriter.create(path, _plan()).pending_chunks() == [1, 2]  # resume: same plan, chunk 0 kept
    moved = _plan()
    moved["producer"]["model_path"] = "/elsewhere"  # a moved model is the same model
    ArtifactWriter.create(path, moved)
    with pytest.raises(ArtifactError, match="different settings \\(params differ\\)"):
        ArtifactWriter.create(path, _plan(temperature=1.0))
    assert ArtifactWriter.create(path, _plan(temperature=1.0), overwrite=True).pending_chunks() == [0, 1, 2]


def test_bad_records_and_corruption(tmp_path):
    w = ArtifactWriter.create(tmp_path / "a", _plan())
    recs = _records(0, 2, 2, np.random.default_rng(0))
    with pytest.raises(ArtifactError, match="got 3 samples, expected 4"):
        w.write_chunk(0, recs[:3])
    recs[1].logprobs = recs[1].logprobs[:-1]
    with pytest.raises(ArtifactError, match="not one per response token"):
        w.write_chunk(0, recs)
    art = _write_all(tmp_path / "b", _plan()).finalize()
    chunk = art.path / "chunks" / "chunk-000001.safetensors"
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="do not match the manifest's fingerprint"):
        RolloutArtifact.open(art.path)
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["extra"]["format_version"] = 99
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        RolloutArtifact.open(art.path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="not a rollout artifact"):
        ArtifactWriter.create(tmp_path / "c", _plan())
