"""The transformers backend against float64 plain-forward references (tolerances: 2e-5 on float32 log-probs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.generation import SamplingParams, load_backend
from megatron_lopd.generation.hf_backend import top_p_filter
from tests.generation.reference import assert_topk_matches, full_logprobs, next_token_logprobs, token_logprobs

ATOL = 2e-5  # float32 model vs float64 reference on a 2-layer model


@pytest.fixture(scope="module")
def backend(tiny_hf_dir):
    be = load_backend("hf", tiny_hf_dir, batch_tokens=300, max_batch=3)  # small batches: padding + several batches
    yield be
    be.close()


def _sequences(rng, count=7):
    prompts = [rng.integers(7, 100, size=int(rng.integers(1, 40))).tolist() for _ in range(count)]
    responses = [rng.integers(0, 128, size=int(rng.integers(1, 60))).tolist() for _ in range(count)]
    return prompts, responses


def test_score_matches_plain_forward(backend, tiny_hf_dir):
    prompts, responses = _sequences(np.random.default_rng(0))
    scored = backend.score(prompts, responses, top_k=5)
    for p, r, s in zip(prompts, responses, scored):
        ref = full_logprobs(tiny_hf_dir, p, r)
        assert s.token_logprobs.dtype == np.float32 and s.token_logprobs.shape == (len(r),)
        np.testing.assert_allclose(s.token_logprobs, token_logprobs(ref, r), atol=ATOL)
        assert s.topk_ids.shape == (len(r), 5) and s.topk_ids.dtype == np.int32
        assert_topk_matches(ref, s.topk_ids, s.topk_logprobs, atol=ATOL)
    assert all(s.topk_ids is None for s in backend.score(prompts[:2], responses[:2], top_k=0))


def test_alignment_entry_t_is_next_token_given_prefix(backend, tiny_hf_dir):
    """Entry t == log p(response[t] | prompt + response[:t]), each from its own forward over that prefix only."""
    prompt, response = [9, 30, 31, 12], [40, 41, 1, 50, 1]
    s = backend.score([prompt], [response], top_k=3)[0]
    for t in range(len(response)):  # t = 0 is the first response token, predicted from the prompt's last position
        ref = next_token_logprobs(tiny_hf_dir, prompt + response[:t])
        assert abs(s.token_logprobs[t] - ref[response[t]]) < ATOL, t
        assert set(s.topk_ids[t].tolist()) == set(np.argsort(-ref)[:3].tolist())
    single = backend.score([[5]], [[1]], top_k=0)[0]  # one-token prompt, a response that is just EOS
    assert abs(single.token_logprobs[0] - next_token_logprobs(tiny_hf_dir, [5])[1]) < ATOL


def test_generate_records_raw_logprobs_and_finish_reasons(backend, tiny_hf_dir):
    prompts = [[9, 20, 21, 22], [9, 33], [9, 40, 41]]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=120, n=3, seed=3, record_logprobs=True)
    out = backend.generate(prompts, params)
    assert [len(x) for x in out] == [3, 3, 3]
    reasons = set()
    for p, samples in zip(prompts, out):
        for s in samples:
            reasons.add(s.finish_reason)
            ends_with_eos = s.response_ids[-1] == 1
            assert (s.finish_reason == "stop") == ends_with_eos and 1 not in s.response_ids[:-1]
            if s.finish_reason == "length":
                assert len(s.response_ids) == 120
            # Raw = temperature 1, full vocabulary: the plain forward's log-prob, not the tempered one.
            ref = token_logprobs(full_logprobs(tiny_hf_dir, p, s.response_ids), s.response_ids)
            np.testing.assert_allclose(s.logprobs, ref, atol=ATOL)
    assert reasons == {"stop", "length"}  # both kinds occur with these seeds


def test_sampling_is_seeded_per_sample_not_per_batch(backend):
    prompts = [[9, 20, 21], [9, 33], [9, 40, 41], [9, 50]]
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=11)
    whole = backend.generate(prompts, params)
    split = backend.generate(prompts[:1], params) + backend.generate(prompts[1:], params, prompt_indices=[1, 2, 3])
    assert [[s.response_ids for s in x] for x in whole] == [[s.response_ids for s in x] for x in split]
    assert whole[0][0].response_ids != whole[0][1].response_ids  # samples of one prompt differ
    other = backend.generate(prompts, SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=12))
    assert [[s.response_ids for s in x] for x in other] != [[s.response_ids for s in x] for x in whole]
    assert whole[0][0].logprobs is None  # not recorded unless asked


def test_greedy_follows_the_argmax(backend, tiny_hf_dir):
    prompt = [9, 20, 21, 22]
    s = backend.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0][0]
    for t, tok in enumerate(s.response_ids):
        assert tok == int(np.argmax(next_token_logprobs(tiny_hf_dir, prompt + s.response_ids[:t])))


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    kept = top_p_filter(probs, 0.75) > 0
    # By hand: 0.5 + 0.3 = 0.8 >= 0.75 -> {1, 2}; uniform: three tokens reach 0.75.
    assert kept[0].tolist() == [False, True, True, False]
    assert kept[1].sum() == 3
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_refuses_bad_inputs(backend, tmp_path):
    with pytest.raises(ArtifactError, match="empty response"):
        backend.score([[5, 6]], [[]], top_k=0)
    with pytest.raises(ArtifactError, match="exceed the model's context of 512"):
        backend.score([[5] * 500], [[6] * 13], top_k=0)
    with pytest.raises(ArtifactError, match="no config.json"):
        load_backend("hf", tmp_path)
    with pytest.raises(ConfigError, match="unknown generation backend 'tgi'"):
        load_backend("tgi", tmp_path)
    with pytest.raises(ConfigError, match="temperature=-1"):
        SamplingParams(temperature=-1)
