"""Record validation (every error names the sequence index) and the top-k encodings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.store import RecordError, SequenceRecord, StoreProvenance, content_hash, synthetic_record
from megatron_lopd.store.schema import decode_topk_inplace, encode_topk, validate_record

from .conftest import VOCAB, spec


def _check(rec, k=4, rollout=True, index=17):
    return validate_record(rec, index, top_k=k, vocab_size=VOCAB, has_rollout_logprobs=rollout)


@pytest.fixture()
def rec():
    r = synthetic_record(3, spec(k=4))
    assert len(r.response_ids) >= 3
    return r


def _with(rec, name, fn):
    arr = np.array(getattr(rec, name), copy=True)
    fn(arr)
    return replace(rec, **{name: arr})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: _with(r, "response_ids", lambda a: a.__setitem__(1, VOCAB)), "outside the vocabulary"),
        (lambda r: _with(r, "prompt_ids", lambda a: a.__setitem__(0, -1)) if len(r.prompt_ids) else
         replace(r, prompt_ids=np.array([-1], np.int32)), "outside the vocabulary"),
        (lambda r: _with(r, "topk_ids", lambda a: a.__setitem__((2, 3), VOCAB + 5)), "outside the vocabulary"),
        (lambda r: _with(r, "teacher_logprobs", lambda a: a.__setitem__(2, np.nan)), "invalid log-prob"),
        (lambda r: _with(r, "rollout_logprobs", lambda a: a.__setitem__(0, np.inf)), "invalid log-prob"),
        (lambda r: _with(r, "teacher_logprobs", lambda a: a.__setitem__(0, 0.5)), "invalid log-prob"),
        (lambda r: _with(r, "topk_logprobs", lambda a: a.__setitem__((1, 2), np.nan)), "invalid log-prob"),
        (lambda r: _with(r, "topk_logprobs", lambda a: a.__setitem__((1, slice(None)), a[1, ::-1].copy())),
         "not sorted descending at position 1"),
        (lambda r: _with(r, "topk_ids", lambda a: a.__setitem__((2, 1), a[2, 0])), "repeat a token at position 2"),
        (lambda r: replace(r, topk_ids=r.topk_ids[:, :3]), "shape"),
        (lambda r: replace(r, teacher_logprobs=r.teacher_logprobs[:-1]), "shape"),
        (lambda r: replace(r, rollout_logprobs=None), "rollout_logprobs is missing"),
        (lambda r: replace(r, response_ids=r.response_ids.astype(np.float32)), "integer"),
        # An off-by-one between the sampled-token log-probs and the top-k rows (a scorer bug).
        (lambda r: replace(r, teacher_logprobs=np.roll(r.teacher_logprobs, 1) - 1.0), "teacher_logprobs["),
    ],
)
def test_invalid_records_are_rejected_with_the_sequence_index(rec, mutate, message):
    bad = mutate(rec)
    with pytest.raises(RecordError) as err:
        _check(bad)
    assert "sequence 17" in str(err.value) and message in str(err.value)
    assert err.value.fix  # every error says how to fix it


def test_store_mode_mismatches_are_rejected(rec):
    with pytest.raises(RecordError, match="sequence 5.*has_rollout_logprobs=False"):
        validate_record(rec, 5, top_k=4, vocab_size=VOCAB, has_rollout_logprobs=False)
    with pytest.raises(RecordError, match="sequence 5.*top_k=0"):
        validate_record(rec, 5, top_k=0, vocab_size=VOCAB, has_rollout_logprobs=True)
    with pytest.raises(RecordError, match="sequence 5.*missing but the store has top_k=4"):
        validate_record(replace(rec, topk_ids=None), 5, top_k=4, vocab_size=VOCAB, has_rollout_logprobs=True)


def test_valid_record_is_normalised_and_tiny_positive_logprobs_clamped(rec):
    lp = rec.teacher_logprobs.astype(np.float64)
    lp[0] = 5e-5  # log-softmax rounding noise, within the documented tolerance
    topk = rec.topk_logprobs.astype(np.float32)
    topk[0, 0] = 5e-5  # the same position's top-1 entry, consistent with the sampled token
    ids = rec.topk_ids.copy()
    resp = rec.response_ids.copy()
    resp[0] = ids[0, 0]
    out = _check(replace(rec, response_ids=resp.astype(np.int64), teacher_logprobs=lp, topk_logprobs=topk))
    assert out.response_ids.dtype == np.int32 and out.teacher_logprobs.dtype == np.float32
    assert out.topk_logprobs.dtype == np.float16
    assert out.teacher_logprobs[0] == 0.0 and out.topk_logprobs[0, 0] == 0.0
    assert out.index == 17


def test_topk_encoding_roundtrips_bitwise_including_edge_values():
    rng = np.random.default_rng(0)
    r, k = 257, 6
    lp = -np.sort(rng.exponential(3.0, (r, k)), axis=1)[:, ::-1] * -1  # descending, <= 0
    lp = -np.sort(-(-np.abs(lp)), axis=1)
    lp[0] = [0.0, -0.0, -1e-7, -6e-5, -60000.0, -65504.0]  # zero, negative zero, subnormal, fp16 extremes
    lp[1, :3] = -0.25  # ties
    lp16 = lp.astype(np.float16)
    assert (np.diff(lp16.astype(np.float32), axis=1) <= 0).all()
    ids = rng.integers(0, 150_000, (r, k)).astype(np.int32)
    resp = rng.integers(0, 150_000, r).astype(np.int32)
    teacher = lp[:, 0].astype(np.float32)  # the sampled token is the top-1 ...
    teacher[::3] = -rng.exponential(5.0, len(teacher[::3]))  # ... or anything else
    ids[::2, 2] = 149_999  # the most frequent id of ranks 2..k, then 5 (ties: the smaller id first)
    ids[1::4, 3] = 5
    ids[3::4, 1] = 4
    enc_ids, codes, vocabulary = encode_topk(resp, teacher, ids, lp16)
    assert enc_ids.shape == (k, r) and codes.dtype == np.uint16 and codes.shape == (k, r)
    assert (codes[0, 1::3] == 0).mean() > 0.9 and (enc_ids[0] == ids[:, 0] - resp).all()
    assert vocabulary.dtype == np.int32 and sorted(vocabulary) == sorted(set(ids[:, 1:].ravel()))
    assert vocabulary[:3].tolist() == [149_999, 4, 5] and (enc_ids[2, ::2] == 0).all()
    assert (vocabulary[enc_ids[1:]] == ids[:, 1:].T).all()
    dec_ids, dec_lp = decode_topk_inplace(resp, teacher, enc_ids.copy(), codes.copy(), vocabulary)
    assert np.array_equal(dec_ids, ids)
    # Bitwise, except that +0.0 and -0.0 both come back as -0.0 (equal as numbers).
    assert np.array_equal(dec_lp.astype(np.float32), lp16.astype(np.float32))
    nonzero = lp16 != 0
    assert np.array_equal(dec_lp.view(np.uint16)[nonzero], lp16.view(np.uint16)[nonzero])
    # k = 1 (no ranks 2..k) and an empty shard: an empty vocabulary.
    for rows in (r, 0):
        one_ids, one_codes, empty = encode_topk(resp[:rows], teacher[:rows], ids[:rows, :1], lp16[:rows, :1])
        assert empty.shape == (0,)
        assert np.array_equal(decode_topk_inplace(resp[:rows], teacher[:rows], one_ids, one_codes, empty)[0], ids[:rows, :1])


def test_content_hash_covers_the_prompt_response_split():
    a = np.array([1, 2, 3], np.int32)
    b = np.array([4, 5], np.int32)
    h = content_hash(a, b)
    assert len(h) == 16 and h == content_hash(a.astype(np.int64), b)
    assert h != content_hash(a[:2], np.concatenate([a[2:], b]))
    rec = SequenceRecord(a, b, np.zeros(2, np.float32))
    assert rec.content_hash == h


def test_provenance_requires_fingerprints_and_keeps_unknown_keys():
    prov = StoreProvenance.from_dict({"teacher_fingerprint": "t", "tokenizer_fingerprint": "k", "scoring_dtype": "bf16"})
    assert prov.extra == {"scoring_dtype": "bf16"} and prov.get("scoring_dtype") == "bf16"
    with pytest.raises(ConfigError, match="teacher_fingerprint is empty"):
        StoreProvenance.coerce({"teacher_fingerprint": "", "tokenizer_fingerprint": "k"})
    with pytest.raises(ConfigError, match="no field 'nope'"):
        prov.get("nope")
