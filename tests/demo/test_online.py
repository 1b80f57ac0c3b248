"""Standard (online) OPD on the trainer: the sampler follows the live student, the teacher scores
live, token counts add up, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch


def _setup(tmp_path):
    from megatron_lopd.demo import task
    from megatron_lopd.models.tiny import write_random_hf_model

    tok = task.build_tokenizer()
    shape = dict(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=128)
    student = write_random_hf_model(tmp_path / "student", seed=1, tokenizer=tok, **shape)
    teacher = write_random_hf_model(tmp_path / "teacher", seed=2, tokenizer=tok, **shape)
    prompts = task.write_prompts(tmp_path / "prompts.jsonl", task.make_splits({"p": 24})["p"])
    return student, teacher, prompts


def _run(tmp_path, run_dir, steps, student, teacher, prompts, loss="lightning_opd"):
    from megatron_lopd.demo.online import OnlineConfig, train_online
    from megatron_lopd.training.config import resolve_config

    cfg = resolve_config("tiny_cpu", [
        f"model.start_from={student}", f"data.store=online:{teacher}", f"run_dir={run_dir}", f"train_steps={steps}", f"loss={loss}",
        "optimizer.lr=1e-3", "data.global_batch=8", "data.pack=false", "data.seq_length=64", "data.micro_batch_size=8",
        "checkpoint.save_every=1", "checkpoint.keep_last=0", "checkpoint.export_hf=true", "data.shuffle=true",
    ])
    # Always the full horizon's schedule (constant lr here), so a 2-step run is a prefix of a 3-step one.
    return train_online(cfg, OnlineConfig(teacher=str(teacher), prompts=str(prompts), max_tokens=12, top_k=4, seed=3))


def _weights(hf_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_online_opd_samples_from_the_live_student_and_resumes(tmp_path):
    student, teacher, prompts = _setup(tmp_path)
    summary, stats = _run(tmp_path, tmp_path / "full", 3, student, teacher, prompts)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # The sampler's log-probs are the live student's (weights copied every step): S / R drift is 0
    # up to float32 noise even after updates, where a stale sampler would show chi2 >> 0.
    for r in records:
        assert r["drift_chi2"] < 1e-6 and abs(r["drift_kl"]) < 1e-6, r
    assert records[-1]["grad_norm"] > 0 and not any(r["skipped"] for r in records)
    # Teacher forward tokens: prompt + response of every scored sequence; 8 per step.
    assert stats.steps == 3 and stats.teacher_forward_tokens > stats.sampled_tokens > 0
    assert stats.teacher_forward_tokens - stats.sampled_tokens == 3 * 8 * 9  # 9-token prompts (`<|user|>dddd*d<|end|><|assistant|>`)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["inputs"]["mode"] == "online" and manifest["extra"]["status"] == "complete"

    # Interrupted after 2 steps, resumed to 3: the same prompts, samples and update, so the same weights.
    _run(tmp_path, tmp_path / "split", 2, student, teacher, prompts)
    _run(tmp_path, tmp_path / "split", 3, student, teacher, prompts)
    a, b = _weights(tmp_path / "full" / "hf"), _weights(tmp_path / "split" / "hf")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    start = _weights(student)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


def test_online_refuses_sft_and_other_tokenizers(tmp_path):
    from megatron_lopd.demo.online import OnlineConfig, train_online
    from megatron_lopd.errors import ConfigError, ConsistencyError
    from megatron_lopd.models.tiny import write_random_hf_model
    from megatron_lopd.training.config import resolve_config

    student, _teacher, prompts = _setup(tmp_path)
    cfg = resolve_config("tiny_cpu", [f"model.start_from={student}", f"data.sft_data={prompts}", "loss=sft", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="distillation loss"):
        train_online(cfg, OnlineConfig(teacher=str(student), prompts=str(prompts)))
    other = write_random_hf_model(tmp_path / "other_tok", seed=4)  # the default character tokenizer: other ids
    cfg = resolve_config("tiny_cpu", [f"model.start_from={student}", f"data.store=online:{other}", f"run_dir={tmp_path / 'r2'}"])
    with pytest.raises(ConsistencyError, match="tokenizer mismatch"):
        train_online(cfg, OnlineConfig(teacher=str(other), prompts=str(prompts)))
