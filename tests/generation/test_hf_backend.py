"""The transformers backend against float64 plain-forward references (tolerances: 2e-5 on float32 log-probs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.generation import SamplingParams, load_backend
from megatron_lopd.generation.hf_backend import _batches_by_tokens, sample_tokens, top_p_filter
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


def _flat(out):
    return [(s.response_ids, s.finish_reason, s.logprobs) for per_prompt in out for s in per_prompt]


def test_samples_do_not_depend_on_batch_size_or_split(tiny_hf_dir):
    """Same seeds, same samples: rows per batch 1 / 2 / 5 / 512, and the prompts split over three calls.

    Mixed prompt lengths (left-padded together from 2 rows per batch on), stop tokens so rows end at
    different steps (finished rows leave the cache mid-batch), and a context of 40 so that long
    prompts get fewer than max_tokens (rows of one batch with different limits). Tokens and finish
    reasons must be identical; log-probs within 1e-5 (float32 matmuls of other shapes differ in
    the last bits: 9.5e-7 measured), and within 2e-5 of float64."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(7, 100, size=int(rng.choice([3, 3, 3, 5, 8, 30]))).tolist() for _ in range(9)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=25, n=3, seed=21, record_logprobs=True,
                            stop_token_ids=(40, 41, 42, 43))
    results = []
    for max_batch in (1, 2, 5, 512):
        be = load_backend("hf", tiny_hf_dir, max_model_len=40, max_batch=max_batch)
        results.append(_flat(be.generate(prompts, params)))
        if max_batch == 5:
            parts = [(0, 2), (2, 7), (7, 9)]
            results.append(_flat(sum((be.generate(prompts[a:b], params, prompt_indices=range(a, b)) for a, b in parts), [])))
        be.close()
    reference = results[0]
    for other in results[1:]:
        assert [r[:2] for r in other] == [r[:2] for r in reference]
        for (_, _, lp), (_, _, ref_lp) in zip(other, reference):
            np.testing.assert_allclose(lp, ref_lp, atol=1e-5, rtol=0)
    stops, lengths = {40, 41, 42, 43, 1}, set()
    for (ids, reason, lp), p in zip(reference, [p for p in prompts for _ in range(3)]):
        lengths.add(len(ids))
        assert not stops & set(ids[:-1]) and (reason == "stop") == (ids[-1] in stops)
        if reason == "length":
            assert len(ids) == min(25, 40 - len(p))
        np.testing.assert_allclose(lp, token_logprobs(full_logprobs(tiny_hf_dir, p, ids), ids), atol=ATOL)
    assert {"stop", "length"} == {r[1] for r in reference} and 10 in lengths  # 30-token prompts: 10 tokens of context left
    assert len({tuple(r[0]) for r in reference[:3]}) == 3  # the samples of one prompt differ


def test_greedy_batched_equals_one_prompt_at_a_time(tiny_hf_dir):
    """Greedy over mixed-length prompts decoded in one left-padded batch == each prompt alone: tokens
    identical, recorded log-probs within 1e-5 (float32 on other shapes); tokens == the float64 argmax."""
    rng = np.random.default_rng(8)
    prompts = [rng.integers(7, 100, size=int(rng.integers(2, 12))).tolist() for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=10, n=2, record_logprobs=True)
    be = load_backend("hf", tiny_hf_dir)
    decoded_lengths = []  # prompt lengths of each decoded batch
    decode = be._decode
    be._decode = lambda batch, *rest: decoded_lengths.append(sorted({len(p) for p in batch})) or decode(batch, *rest)
    batched = be.generate(prompts, params)
    assert decoded_lengths == [sorted({len(p) for p in prompts})] and len(decoded_lengths[0]) > 5  # one mixed batch
    alone = [be.generate([p], params)[0] for p in prompts]
    be.close()
    assert [[s.response_ids for s in x] for x in batched] == [[s.response_ids for s in x] for x in alone]
    for x, y in zip(batched, alone):
        for s, s_alone in zip(x, y):
            np.testing.assert_allclose(s.logprobs, s_alone.logprobs, atol=1e-5, rtol=0)
    for p, (first, second) in zip(prompts, batched):
        assert first.response_ids == second.response_ids  # greedy ignores the seed
        for t, tok in enumerate(first.response_ids):
            ref = next_token_logprobs(tiny_hf_dir, p + first.response_ids[:t])
            runner_up = np.sort(ref)[-2]
            assert ref[tok] == ref.max() or ref.max() - runner_up < 1e-5, (p, t)  # a float64 near-tie may go either way


def test_a_row_ends_at_its_own_context_in_a_batch_that_goes_on(tiny_hf_dir):
    """A 30-token prompt (context 33: 3 new tokens) batched with a 2-token one (8 new tokens): the long row
    ends at 3 tokens with "length", although the batch decodes on and its 4th greedy token would stop it."""
    long_prompt, short_prompt = list(range(10, 40)), [9, 20]
    free = load_backend("hf", tiny_hf_dir)
    continuation = free.generate([long_prompt], SamplingParams(temperature=0, max_tokens=4))[0][0].response_ids
    free.close()
    stop = continuation[3]
    assert len(continuation) == 4 and stop not in continuation[:3]  # the setup: the 4th token would be a stop
    be = load_backend("hf", tiny_hf_dir, max_model_len=33)
    long_sample, short_sample = (x[0] for x in be.generate([long_prompt, short_prompt],
                                                          SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,))))
    be.close()
    assert (long_sample.response_ids, long_sample.finish_reason) == (continuation[:3], "length")
    assert len(short_sample.response_ids) > 3  # the batch went on past the long row's limit


def test_batches_are_bounded_by_tokens_not_by_equal_lengths():
    """rows x (longest prompt + most new tokens) <= budget, longest first, whatever the lengths; one row at least."""
    lengths, new = [5, 30, 7, 12, 3, 100], [20, 10, 20, 20, 20, 0]
    batches = _batches_by_tokens(lengths, 120, 8, new_tokens=new)
    # 2 x (100 + 10) > 120; 2 x (30 + 20) = 100 but 3 x 50 > 120; 3 x (7 + 20) = 81.
    assert batches == [[5], [1, 3], [2, 0, 4]]
    assert _batches_by_tokens(lengths, 120, 2, new_tokens=new) == [[5], [1, 3], [2, 0], [4]]  # max_rows
    assert _batches_by_tokens([50, 40, 10], 90, 8) == [[0], [1, 2]]  # scoring: rows x longest
    assert _batches_by_tokens([50, 40, 10], 100, 8) == [[0, 1], [2]]


def test_logsoftmax_chunks_follow_the_byte_budget(backend, tiny_hf_dir):
    """Scoring in 3-position log-softmax chunks (a budget of 3 float32 rows x 2 buffers) == unchunked:
    token log-probs, top-k ids and log-probs within 1e-5 (the LM head on other row counts: a few float32 ulps)."""
    vocab = 128
    chunked = load_backend("hf", tiny_hf_dir, batch_tokens=300, max_batch=3, logsoftmax_bytes=3 * vocab * 8 + 7)
    assert chunked.logsoftmax_rows == 3 and backend.logsoftmax_rows >= 300  # the module's backend: one chunk per batch
    prompts, responses = _sequences(np.random.default_rng(2))
    for s, ref in zip(chunked.score(prompts, responses, top_k=6), backend.score(prompts, responses, top_k=6)):
        np.testing.assert_allclose(s.token_logprobs, ref.token_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(s.topk_ids, ref.topk_ids)
        np.testing.assert_allclose(s.topk_logprobs, ref.topk_logprobs, atol=1e-5, rtol=0)
    chunked.close()
    default = load_backend("hf", tiny_hf_dir)
    assert default.logsoftmax_rows == (512 << 20) // (vocab * 8)  # 512 MiB: 441 positions at Qwen3's 151,936
    default.close()


def test_sample_tokens_follows_the_tempered_top_p_distribution():
    """Inverse CDF at N evenly spaced uniforms: each token is picked N * p times (+-1), p from a float64 re-derivation."""
    logits = torch.tensor([[2.0, -1.0, 0.5, float("-inf"), 1.0, -3.0, 0.0]])
    temperature, top_p, n = 0.7, 0.9, 10_000
    p = np.exp(logits[0].double().numpy() / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    kept = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]  # smallest set reaching top_p
    expected = np.zeros_like(p)
    expected[kept] = p[kept] / p[kept].sum()
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picked = sample_tokens(logits.expand(n, -1), uniforms, temperature, top_p)
    counts = np.bincount(picked.numpy(), minlength=len(p))
    assert np.all(np.abs(counts - n * expected) <= 1), (counts, n * expected)
    assert counts[3] == 0 and len(kept) < 6  # -inf never, and top-p did drop something
    # The ends of [0, 1) never land on a zero-probability token; temperature 0 is the argmax.
    edge = torch.tensor([[float("-inf"), 1.0, 0.0, float("-inf")]] * 2)
    assert sample_tokens(edge, torch.tensor([0.0, 1 - 2.0**-53], dtype=torch.float64), 1.0, 1.0).tolist() == [1, 2]
    assert sample_tokens(logits, None, 0.0, 1.0).tolist() == [0]


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
    with pytest.raises(ConfigError, match="prompt_indices has 1 entries for 2 prompts"):
        backend.generate([[5], [6]], SamplingParams(), prompt_indices=[3])
