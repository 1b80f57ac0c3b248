"""`lopd score`: rollouts -> teacher store, checked position by position against plain float64 forwards;
workers and finalize, a SIGKILLed scorer resumed, and bad inputs refused without losing scored shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_lopd.cli import main
from megatron_lopd.artifacts import ArtifactWriter, RolloutArtifact
from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint
from megatron_lopd.store import TeacherStore
from tests.generation.reference import assert_topk_matches, full_logprobs, next_token_logprobs, token_logprobs

EOS = 1
ATOL = 2e-5  # float32 teacher vs float64 reference


def _score_args(rollouts, teacher, out, *extra):
    return ["score", "--rollouts", str(rollouts), "--teacher", str(teacher), "--out", str(out), "--backend", "hf",
            "--top-k", "8", "--sequences-per-shard", "3", "--no-progress", *extra]


def _store_records(path):
    store = TeacherStore.open(path)
    return [store[i] for i in range(len(store))]


def _assert_same_store(a, b):
    ra, rb = _store_records(a), _store_records(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for name in ("prompt_ids", "response_ids", "teacher_logprobs", "topk_ids", "topk_logprobs", "rollout_logprobs"):
            np.testing.assert_array_equal(np.asarray(getattr(x, name)), np.asarray(getattr(y, name)), err_msg=name)
        assert (x.prompt_id, x.sample_index) == (y.prompt_id, y.sample_index)
    for shard in sorted((Path(a) / "shards").iterdir()):  # and the shard files byte for byte
        if shard.is_dir():
            for f in sorted(p for p in shard.rglob("*") if p.is_file()):
                assert f.read_bytes() == (Path(b) / f.relative_to(a)).read_bytes(), f


@pytest.fixture(scope="module")
def scored_store(hf_rollouts, tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, out)) == 0
    return out


def test_store_equals_plain_forward_position_by_position(scored_store, hf_rollouts, tiny_teacher_dir):
    store = TeacherStore.open(scored_store, require={"teacher_fingerprint": model_fingerprint(tiny_teacher_dir)})
    assert len(store) == len(hf_rollouts) == 12
    finishes = set()
    for i, rec in enumerate(hf_rollouts):
        got = store[i]
        np.testing.assert_array_equal(got.prompt_ids, rec.prompt_ids)
        np.testing.assert_array_equal(got.response_ids, rec.response_ids)
        assert (got.prompt_id, got.sample_index) == (rec.prompt_id, rec.sample_index)
        np.testing.assert_array_equal(got.rollout_logprobs, rec.logprobs)  # the student's own, for the drift monitor
        ref = full_logprobs(tiny_teacher_dir, rec.prompt_ids, rec.response_ids)
        np.testing.assert_allclose(got.teacher_logprobs, token_logprobs(ref, rec.response_ids), atol=ATOL)
        # Stored top-k log-probs are float16: relative error <= 2^-11.
        assert_topk_matches(ref, np.asarray(got.topk_ids), np.asarray(got.topk_logprobs, np.float64), atol=ATOL, rtol=1e-3)
        # Alignment, from forwards over the exact prefixes: the first response token ...
        first = next_token_logprobs(tiny_teacher_dir, rec.prompt_ids)[rec.response_ids[0]]
        assert abs(got.teacher_logprobs[0] - first) < ATOL
        # ... and the last one: EOS of a finished response is scored; a truncated one ends without EOS.
        last = next_token_logprobs(tiny_teacher_dir, np.concatenate([rec.prompt_ids, rec.response_ids[:-1]]))
        assert abs(got.teacher_logprobs[-1] - last[rec.response_ids[-1]]) < ATOL
        assert (rec.response_ids[-1] == EOS) == (rec.finish_reason == "stop")
        assert len(got.teacher_logprobs) == len(rec.response_ids)
        if rec.finish_reason == "length":
            assert len(rec.response_ids) == 100
        finishes.add(rec.finish_reason)
    assert finishes == {"stop", "length"}


def test_provenance_records_what_the_consistency_check_needs(scored_store, hf_rollouts, tiny_teacher_dir):
    prov = TeacherStore.open(scored_store).meta.provenance
    assert prov.teacher_fingerprint == model_fingerprint(tiny_teacher_dir)
    assert prov.tokenizer_fingerprint == tokenizer_fingerprint(tiny_teacher_dir) == hf_rollouts.tokenizer_fingerprint
    assert prov.rollouts_fingerprint == hf_rollouts.fingerprint
    assert prov.rollout_generator_fingerprint == hf_rollouts.generator_fingerprint
    assert prov.chat_template == hf_rollouts.chat_template and prov.engine == "hf" and prov.engine_version
    assert prov.extra["scoring_dtype"] == "float32" and prov.extra["rollout_sampling"]["temperature"] == 1.0


def test_workers_then_finalize_equal_one_process(scored_store, hf_rollouts, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "store"
    for i in range(3):
        assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, out, "--shard", f"{i}/3")) == 0
        assert "not finalized yet" in capsys.readouterr().out
    with pytest.raises(Exception, match="not complete|incomplete"):
        TeacherStore.open(out)
    assert main(["score", "--out", str(out), "--finalize", "--no-progress"]) == 0
    _assert_same_store(out, scored_store)


def _lopd() -> list[str]:
    script = Path(sys.executable).with_name("lopd")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]


def test_sigkilled_scorer_resumes_to_the_same_store(scored_store, hf_rollouts, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "store"
    cmd = _lopd() + _score_args(hf_rollouts.path, tiny_teacher_dir, out)
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / "markers"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and any(markers.glob("*.json")):
            proc.send_signal(signal.SIGKILL)  # mid-run: between shards or inside one, wherever it is
            break
        time.sleep(0.002)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, f"scorer was not killed mid-run (rc={rc}): {proc.stderr.read().decode()[-500:]}"
    done = len(list(markers.glob("*.json")))
    assert 1 <= done < 4, done
    with pytest.raises(Exception, match="not complete|incomplete"):
        TeacherStore.open(out)
    assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, out)) == 0  # the rerun scores only what is missing
    assert f"{4 - done} shards scored" in capsys.readouterr().out
    _assert_same_store(out, scored_store)  # same shard size as the uninterrupted run: byte-identical


def _artifact_with_empty_response(src: RolloutArtifact, dest: Path) -> Path:
    """A copy of `src` whose record 4 has an empty response (written through the artifact writer)."""
    plan = {"kind": src.kind, "producer": src.manifest.producer, "inputs": src.manifest.inputs,
            "params": src.manifest.params,
            "layout": {"num_prompts": src.num_prompts, "n": src.n, "chunk_size": src.chunk_size, "has_logprobs": src.has_logprobs}}
    w = ArtifactWriter.create(dest, plan)
    records = list(src)
    records[4].response_ids = records[4].response_ids[:0]
    records[4].logprobs = records[4].logprobs[:0]
    per_chunk = src.chunk_size * src.n
    for c in range(len(w.ranges)):
        w.write_chunk(c, records[c * per_chunk : (c + 1) * per_chunk])
    w.finalize()
    return dest


def test_bad_inputs_one_line_and_scored_shards_kept(hf_rollouts, tiny_teacher_dir, tmp_path, capsys):
    from megatron_lopd.models.tiny import write_random_hf_model
    from megatron_lopd.models.tokenizer import build_char_tokenizer

    out = tmp_path / "store"
    assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, out, "--shard", "0/2")) == 0  # half scored
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    other_tok = write_random_hf_model(tmp_path / "other_tok", tokenizer=build_char_tokenizer(chars="abcdefgh0123456789 "))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_teacher_dir, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    short = tmp_path / "short_ctx"
    shutil.copytree(tiny_teacher_dir, short)
    empty = _artifact_with_empty_response(hf_rollouts, tmp_path / "empty_resp")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(hf_rollouts.path, incomplete)
    (incomplete / "manifest.json").unlink()
    capsys.readouterr()
    cases = [
        ([hf_rollouts.path, other_tok], "tokenizer mismatch"),
        ([hf_rollouts.path, no_weights], "no weight files"),
        ([empty, tiny_teacher_dir], "record 4 (prompt 'q2', sample 0) has an empty response"),
        ([incomplete, tiny_teacher_dir], "incomplete rollout artifact"),
        ([hf_rollouts.path, tiny_teacher_dir, "--max-model-len", "40"], "over the teacher's context of 40"),
        ([hf_rollouts.path, tiny_teacher_dir, "--top-k", "4"], "exists with different parameters"),
    ]
    for (rollouts, teacher, *extra), expected in cases:
        args = _score_args(rollouts, teacher, out, "--shard", "1/2", *extra)
        if "--top-k" in extra:
            args.remove("8"), args.remove("--top-k")  # keep only the conflicting --top-k 4
        assert main(args) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lopd score: error:") and expected in err[0], err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing scored was lost or touched
    assert main(_score_args(hf_rollouts.path, tiny_teacher_dir, out, "--shard", "1/2")) == 0  # and it still completes
    assert main(["score", "--out", str(out), "--finalize", "--no-progress"]) == 0
