"""`lopd generate`: sharded == unsharded, resume, plan checks, the manifest, bad prompts via the CLI."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.cli import main
from megatron_lopd.errors import ArtifactError, ConfigError, LopdError
from megatron_lopd.artifacts import ArtifactWriter, RolloutArtifact
from megatron_lopd.generation import SamplingParams, load_backend
from megatron_lopd.generation.generate import GenerateConfig, generate_artifact
from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint
from tests.generation.conftest import write_prompts

SAMPLING = SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=3, record_logprobs=True)


@pytest.fixture(scope="module")
def backend(tiny_hf_dir):
    be = load_backend("hf", tiny_hf_dir)
    yield be
    be.close()


@pytest.fixture(scope="module")
def prompts5(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("p5") / "p.jsonl", n=5)


def _cfg(model, prompts, out, **kw):
    kw.setdefault("sampling", SAMPLING)
    return GenerateConfig(model=model, prompts=prompts, out=out, backend="hf", chunk_size=2, progress=False, **kw)


def _records(art):
    return [(r.prompt_id, r.sample_index, r.prompt_ids.tolist(), r.response_ids.tolist(), r.finish_reason, r.text,
             r.logprobs.tolist()) for r in art]


def test_shards_merge_to_the_unsharded_artifact(tiny_hf_dir, prompts5, tmp_path, backend):
    whole = generate_artifact(_cfg(tiny_hf_dir, prompts5, tmp_path / "whole"), backend=backend).artifact
    assert len(whole) == 10
    for n in (2, 3):
        out = tmp_path / f"split{n}"
        results = [generate_artifact(_cfg(tiny_hf_dir, prompts5, out, shard=(i, n)), backend=backend) for i in range(n)]
        assert all(r.artifact is None for r in results[:-1]) and results[-1].artifact is not None
        assert [r.chunks_written for r in results] == [len(range(i, 3, n)) for i in range(n)]
        merged = RolloutArtifact.open(out)
        assert merged.fingerprint == whole.fingerprint
        assert _records(merged) == _records(whole)


def test_resume_skips_written_chunks_and_refuses_other_settings(tiny_hf_dir, prompts5, tmp_path, backend):
    out = tmp_path / "ro"
    first = generate_artifact(_cfg(tiny_hf_dir, prompts5, out, shard=(0, 2)), backend=backend)
    assert first.chunks_written == 2 and first.chunks_missing == 1
    with pytest.raises(ArtifactError, match="incomplete rollout artifact"):
        RolloutArtifact.open(out)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir()}
    resumed = generate_artifact(_cfg(tiny_hf_dir, prompts5, out), backend=backend)  # "crashed" run restarted
    assert resumed.chunks_written == 1 and resumed.artifact is not None
    assert all((out / "chunks" / name).stat().st_mtime_ns == t for name, t in kept.items())
    hotter = SamplingParams(temperature=0.5, max_tokens=16, n=2, seed=3, record_logprobs=True)
    with pytest.raises(ArtifactError, match="different settings \\(params differ\\)"):
        generate_artifact(_cfg(tiny_hf_dir, prompts5, out, sampling=hotter), backend=backend)


def _longest_prompt(model, prompts) -> int:
    from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer

    return max(len(ids) for ids in load_prompt_set(prompts, load_tokenizer(model)).token_ids)


def test_max_model_len_is_no_part_of_the_identity(tiny_hf_dir, prompts5, tmp_path, backend):
    """It cannot change the bytes: not recorded, a resume may change it, and one that would cut a
    response (longest prompt + max_tokens) is refused before anything is written."""
    needed = _longest_prompt(tiny_hf_dir, prompts5) + SAMPLING.max_tokens
    out = tmp_path / "ro"
    with pytest.raises(ConfigError, match=rf"--max-model-len {needed - 1} would cut responses short of --max-tokens 16: "
                                          rf"the longest prompt \+ --max-tokens is {needed} tokens .*raise --max-model-len to {needed}"):
        generate_artifact(_cfg(tiny_hf_dir, prompts5, out, max_model_len=needed - 1), backend=backend)
    assert not out.exists()
    first = generate_artifact(_cfg(tiny_hf_dir, prompts5, out, shard=(0, 2), max_model_len=needed), backend=backend)
    assert first.chunks_written == 2
    assert "max_model_len" not in json.loads((out / "plan.json").read_text())["params"]
    assert generate_artifact(_cfg(tiny_hf_dir, prompts5, out, max_model_len=4 * needed), backend=backend).artifact is not None


class _EngineThatCannotStart:
    def generate(self, *args, **kwargs):
        raise LopdError("vLLM could not start an engine", "lower --max-model-len")


def test_an_artifact_with_no_chunk_yet_is_replanned(tiny_hf_dir, prompts5, tmp_path, backend, caplog):
    """A run whose engine could not start wrote only the plan: the retry may change any setting. Once a
    chunk exists the plan is fixed, and a run still holding the replaced plan stops before it writes."""
    out = tmp_path / "ro"
    with pytest.raises(LopdError, match="could not start"):
        generate_artifact(_cfg(tiny_hf_dir, prompts5, out), backend=_EngineThatCannotStart())
    stale = ArtifactWriter(out, json.loads((out / "plan.json").read_text()))
    shorter = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=3, record_logprobs=True)
    art = generate_artifact(_cfg(tiny_hf_dir, prompts5, out, sampling=shorter), backend=backend).artifact
    assert "re-planned with the new settings (params changed)" in caplog.text
    assert art.manifest.params["max_tokens"] == 8 and max(len(r.response_ids) for r in art) <= 8
    with pytest.raises(ArtifactError, match="different settings \\(params differ\\)"):
        generate_artifact(_cfg(tiny_hf_dir, prompts5, out), backend=backend)
    with pytest.raises(ArtifactError, match="re-planned with other settings by another `lopd generate` while this one ran"):
        stale.write_chunk(0, [art[i] for i in range(4)])


def test_cli_manifest_records_provenance(tiny_hf_dir, prompts5, tmp_path, capsys):
    out = tmp_path / "sft"
    rc = main(["generate", "--model", str(tiny_hf_dir), "--prompts", str(prompts5), "--out", str(out), "--backend", "hf",
               "--kind", "sft_data", "--n", "1", "--temperature", "0.7", "--top-p", "0.9", "--max-tokens", "8",
               "--seed", "4", "--thinking", "off", "--no-progress"])
    assert rc == 0 and "wrote sft_data artifact" in capsys.readouterr().out
    art = RolloutArtifact.open(out)
    m = art.manifest
    assert art.kind == "sft_data" and not art.has_logprobs and art[0].logprobs is None
    assert m.producer["generator_fingerprint"] == model_fingerprint(tiny_hf_dir)
    assert m.producer["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_hf_dir)
    assert "<|assistant|>" in m.producer["chat_template"]
    assert {k: m.params[k] for k in ("temperature", "top_p", "max_tokens", "n", "seed", "thinking")} == \
        {"temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "n": 1, "seed": 4, "thinking": False}
    assert m.inputs["prompts_fingerprint"].startswith("prompts-") and m.inputs["num_prompts"] == 5
    from megatron_lopd.generation.prompts import load_tokenizer

    tok = load_tokenizer(tiny_hf_dir)
    assert tok.decode(art[0].prompt_ids).endswith("<|assistant|><think></think>")  # thinking off
    for rec in art:
        body = rec.response_ids[:-1] if rec.finish_reason == "stop" else rec.response_ids
        assert rec.text == tok.decode(body)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_bad_inputs_one_line_each(tiny_hf_dir, tmp_path, capsys):
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"id": "x", "prompt": "a" * 600}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2,\n')
    no_weights = tmp_path / "empty_model"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    cases = [
        (["--prompts", str(long_prompt)], "prompt 'x' has 603 tokens, no room to generate within the model's context of 512"),
        (["--prompts", str(broken)], "broken.jsonl:2: invalid JSON"),
        (["--prompts", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--prompts", str(broken), "--model", str(no_weights)], "no weight files"),
        (["--prompts", str(broken), "--shard", "2/2"], "--shard 2/2: need 0 <= I < N"),
        (["--prompts", str(write_prompts(tmp_path / "ok.jsonl", n=1)), "--max-tokens", "16", "--max-model-len", "20"],
         "--max-model-len 20 would cut responses short of --max-tokens 16"),
    ]
    for extra, expected in cases:
        args = ["generate", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "out"), "--backend", "hf", *extra]
        assert main(args) == 2
        line = _one_error_line(capsys)
        assert line.startswith("lopd generate: error:") and expected in line, line
    assert not (tmp_path / "out").exists()  # refused before anything was written
