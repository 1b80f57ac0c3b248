"""The training loop end to end on CPU (gloo): Lightning OPD and SFT on the tiny Qwen3.

The data is a miniature of the real pipeline, built with plain transformers: the
teacher (tiny_teacher_dir) writes SFT responses, the student (tiny_hf_dir) samples
rollouts and records its raw log-probs, the teacher scores them (log-prob of each
sampled token + top-k), and the store writer stores the scores. Independent references
are computed here in float64 with transformers.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run_distributed

TOP_K = 4
NUM_PROMPTS = 24
METRICS_KEYS = {"step", "loss", "kl_to_teacher", "drift_chi2", "drift_kl", "grad_norm", "lr", "tokens", "tokens_per_s"}


# --------------------------------------------------------------------------------------
# The miniature pipeline (session-scoped: built once, reused by test_checkpointing too).


def _prompts(tok, n=NUM_PROMPTS, seed=0):
    rng = np.random.default_rng(seed)
    return [tok.encode(f"{a}+{b}=", add_special_tokens=False) for a, b in rng.integers(0, 99, (n, 2))]


@torch.no_grad()
def _sample(model, prompts, max_new, seed, eos_id):
    torch.manual_seed(seed)
    out = []
    for p in prompts:
        # The pad token never appears in real text (its HF embedding row is zero, a degenerate input).
        ids = model.generate(torch.tensor([p]), do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new,
                             eos_token_id=eos_id, pad_token_id=0, suppress_tokens=[0])[0, len(p):].tolist()
        out.append(ids)
    return out


@torch.no_grad()
def token_logprobs(model, prompt, response, k=0):
    """float64 log-probs of each response token (and the top-k) under `model`, raw logits."""
    ids = torch.tensor([list(prompt) + list(response)])
    lp = model.double()(ids).logits[0].log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    token = lp[pos, torch.tensor(response)]
    if not k:
        return token
    top = lp[pos].topk(k)
    return token, top.indices, top.values


def write_store(path, records, *, teacher_fp, tokenizer_fp, policy_fp, top_k=TOP_K, vocab_size=128, rollouts_fp="data-test"):
    from megatron_lopd.store import StoreProvenance, StoreWriter, finalize_store

    prov = StoreProvenance(teacher_fingerprint=teacher_fp, tokenizer_fingerprint=tokenizer_fp,
                           rollout_generator_fingerprint=policy_fp, rollouts_fingerprint=rollouts_fp)
    w = StoreWriter.create(path, num_sequences=len(records), top_k=top_k, vocab_size=vocab_size, provenance=prov,
                           sequences_per_shard=16, has_rollout_logprobs=True)
    for shard in w.pending_shards():
        w.write_shard(shard, [records[i] for i in w.shard_range(shard)])
    finalize_store(path)
    return Path(path)


def write_sft_artifact(path, prompts, responses, *, generator_fp, tokenizer_fp):
    from megatron_lopd.artifacts import ArtifactWriter, RolloutRecord

    plan = {
        "kind": "sft_data",
        "producer": {"generator_fingerprint": generator_fp, "tokenizer_fingerprint": tokenizer_fp},
        "inputs": {"prompts_fingerprint": "data-prompts", "num_prompts": len(prompts)},
        "params": {"temperature": 1.0},
        "layout": {"num_prompts": len(prompts), "n": 1, "chunk_size": 8, "has_logprobs": False},
    }
    w = ArtifactWriter.create(path, plan)
    for c, (start, stop) in enumerate(w.ranges):
        w.write_chunk(c, [
            RolloutRecord(prompt_id=f"p{i}", sample_index=0, prompt_ids=np.array(prompts[i], np.int32),
                          response_ids=np.array(responses[i], np.int32), finish_reason="stop", text="", prompt_index=i)
            for i in range(start, stop)
        ])
    return w.finalize()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tiny_hf_dir, tiny_teacher_dir):
    """SFT data from the teacher, rollouts from the student, teacher-scored store."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_lopd.provenance import model_fingerprint, tokenizer_fingerprint
    from megatron_lopd.store import SequenceRecord

    # Built once per session, also when test_checkpointing imports this fixture.
    root = tmp_path_factory.getbasetemp() / "train_pipeline"
    cached = root / "pipeline.pkl"
    if cached.is_file():
        return pickle.loads(cached.read_bytes())
    root.mkdir()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    fp_s, fp_t, fp_tok = model_fingerprint(tiny_hf_dir), model_fingerprint(tiny_teacher_dir), tokenizer_fingerprint(tiny_hf_dir)
    prompts = _prompts(tok)
    sft_responses = _sample(teacher, prompts, 12, seed=1, eos_id=tok.eos_token_id)
    sft_dir = root / "sft_data"
    write_sft_artifact(sft_dir, prompts, sft_responses, generator_fp=fp_t, tokenizer_fp=fp_tok)
    rollouts = _sample(student, prompts, 16, seed=2, eos_id=tok.eos_token_id)
    records = []
    for i, (p, r) in enumerate(zip(prompts, rollouts)):
        lp_t, top_ids, top_lp = token_logprobs(teacher, p, r, TOP_K)
        lp_r = token_logprobs(student, p, r)
        records.append(SequenceRecord(
            prompt_ids=np.array(p, np.int32), response_ids=np.array(r, np.int32),
            teacher_logprobs=lp_t.float().numpy(), topk_ids=top_ids.int().numpy(), topk_logprobs=top_lp.float().numpy(),
            rollout_logprobs=lp_r.float().numpy(), prompt_id=f"p{i}", sample_index=0,
        ))
    store = write_store(root / "store", records, teacher_fp=fp_t, tokenizer_fp=fp_tok, policy_fp=fp_s)
    out = {"root": root, "store": store, "sft_data": sft_dir, "student": Path(tiny_hf_dir), "teacher": Path(tiny_teacher_dir),
            "records": records, "prompts": prompts, "sft_responses": sft_responses, "fp_student": fp_s, "fp_teacher": fp_t,
            "fp_tokenizer": fp_tok}
    cached.write_bytes(pickle.dumps(out))
    return out


def opd_overrides(pipeline, run_dir, **extra):
    """A tiny Lightning OPD run on the pipeline's store."""
    base = {
        "run_dir": run_dir,
        "model.start_from": pipeline["student"],
        "data.store": pipeline["store"],
        "data.sft_data": pipeline["sft_data"],
        "data.global_batch": 8,
        "data.seq_length": 64,
        "train_steps": 8,
        "optimizer.lr": 3e-3,
        "checkpoint.save_every": 0,
        "checkpoint.export_hf": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# --------------------------------------------------------------------------------------
# Functions run in spawned ranks (module level so that they pickle).


def _train_runs(runs: list[list[str]]):
    """Train each (config overrides) in turn in this process; returns summaries or error lines."""
    import torch

    torch.set_num_threads(1)
    from megatron_lopd.errors import LopdError
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.loop import train

    import os

    out = []
    base_port = int(os.environ.get("MASTER_PORT", "0"))
    for i, overrides in enumerate(runs):
        if base_port:  # a fresh rendezvous per run: a fast rank must not reach the previous run's store
            os.environ["MASTER_PORT"] = str(base_port + 1 + i)
        try:
            s = train(resolve_config("tiny_cpu", overrides))
            out.append({"losses": s.losses, "records": s.records, "hf_export": str(s.hf_export) if s.hf_export else None,
                        "final_checkpoint": str(s.final_checkpoint) if s.final_checkpoint else None,
                        "warnings": s.consistency_warnings, "nonfinite": s.nonfinite_steps})
        except LopdError as exc:
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def read_metrics(run_dir):
    from megatron_lopd.training.metrics_log import read_metrics as read

    return read(run_dir)


# --------------------------------------------------------------------------------------


def step_reference(pipeline, consumed, global_batch=8, seed=1234):
    """float64 references for one step's batch, with the *start* student and plain transformers:
    the Lightning OPD loss and its gradient norm, kl_to_teacher, drift chi2, top-1 agreement."""
    from transformers import AutoModelForCausalLM

    from megatron_lopd.training.data import step_indices

    student = AutoModelForCausalLM.from_pretrained(pipeline["student"], dtype=torch.float64).eval()
    idx = step_indices(len(pipeline["records"]), consumed, global_batch, seed)
    diffs, chi2, agree, loss = [], [], [], 0.0
    for i in idx:
        r = pipeline["records"][i]
        P, R = len(r.prompt_ids), len(r.response_ids)
        logits = student(torch.tensor([r.prompt_ids.tolist() + r.response_ids.tolist()])).logits[0, P - 1 : P + R - 1]
        lp_s = logits.log_softmax(-1)[torch.arange(R), torch.tensor(r.response_ids.tolist())]
        lp_t = torch.from_numpy(r.teacher_logprobs.astype(np.float64))
        loss = loss + (-(lp_t - lp_s).detach() * lp_s).mean() / global_batch  # the paper's token loss, per-sequence mean
        d = lp_s.detach().numpy()
        diffs += (d - lp_t.numpy()).tolist()
        chi2 += (np.expm1(d - r.rollout_logprobs.astype(np.float64)) ** 2).tolist()
        agree += (logits.argmax(-1).numpy() == r.topk_ids[:, 0]).tolist()
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.square().sum()) for p in student.parameters() if p.grad is not None))
    return {"loss": loss.item(), "grad_norm": grad_norm, "kl_to_teacher": float(np.mean(diffs)),
            "drift_chi2": float(np.mean(chi2)), "top1_agreement": float(np.mean(agree))}


def test_lightning_opd_and_sft_end_to_end(pipeline, tmp_path):
    opd_dir, sft_dir = tmp_path / "opd", tmp_path / "sft"
    sft = [f"run_dir={sft_dir}", "loss=sft", f"model.start_from={pipeline['student']}",
           f"data.sft_data={pipeline['sft_data']}", "data.global_batch=8", "data.seq_length=64", "train_steps=8",
           "optimizer.lr=3e-3", "schedule.kind=cosine", "schedule.warmup_steps=2", "optimizer.min_lr=3e-4",
           "checkpoint.save_every=0", "checkpoint.export_hf=false"]
    opd, sft_run = run_distributed(
        _train_runs, world_size=1,
        runs=[opd_overrides(pipeline, opd_dir, **{"checkpoint.export_hf": "true", "logging.tensorboard": "true"}), sft],
    )[0]
    assert "error" not in opd and "error" not in sft_run, (opd, sft_run)

    # metrics.jsonl: one object per step with the documented keys.
    for run_dir, summary in ((opd_dir, opd), (sft_dir, sft_run)):
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, 9))
        assert all(METRICS_KEYS <= set(r) for r in rows)
        assert all(r["sequences"] == 8 and r["tokens"] > 0 and r["tokens_per_s"] > 0 and not r["skipped"] for r in rows)
        assert [r["loss"] for r in rows] == [summary["losses"][s] for s in range(1, 9)]
        assert rows[-1]["consumed_sequences"] == 64 and rows[-1]["epoch"] == pytest.approx(64 / NUM_PROMPTS)

    # Step 1 metrics equal float64 references computed with transformers on the same batch
    # (the student before any update). Tolerance 2e-4: float32 Megatron vs float64 HF.
    rows = read_metrics(opd_dir)
    ref = step_reference(pipeline, consumed=0)
    assert rows[0]["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)  # loss, backward, DDP reduction
    assert rows[0]["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"], abs=1e-5)
    assert rows[0]["drift_chi2"] == pytest.approx(ref["drift_chi2"], abs=1e-6) and rows[0]["drift_chi2"] < 1e-6  # S == R at step 1
    assert rows[0]["top1_agreement"] == pytest.approx(ref["top1_agreement"], abs=1e-9)
    assert rows[0]["mfu"] is None and rows[0]["lr"] == pytest.approx(3e-3)
    # Lightning OPD pulls the student's log-probs towards the teacher's: the reverse-KL estimate
    # and |kl_to_teacher| shrink, the drift from the rollout policy grows from 0.
    rkl = [r["reverse_kl"] for r in rows]
    assert np.mean(rkl[-2:]) < 0.7 * np.mean(rkl[:2]), rkl
    assert rows[-1]["drift_chi2"] > 1e-3

    # SFT: cross-entropy on the teacher-written responses decreases; the cosine schedule with warmup.
    srows = read_metrics(sft_dir)
    ce = [r["loss"] for r in srows]
    assert np.mean(ce[-2:]) < 0.8 * np.mean(ce[:2]), ce
    assert all(r["kl_to_teacher"] is None and r["drift_chi2"] is None for r in srows)
    lrs = [r["lr"] for r in srows]
    expected = [3e-3 * s / 2 if s <= 2 else 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-9)

    # Run metadata and TensorBoard.
    manifest = json.loads((opd_dir / "manifest.json").read_text())
    assert manifest["kind"] == "run" and manifest["extra"]["status"] == "complete"
    assert manifest["inputs"]["teacher_fingerprint"] == pipeline["fp_teacher"] == manifest["inputs"]["sft_data_generator"]
    assert manifest["inputs"]["rollout_policy"] == pipeline["fp_student"] == manifest["inputs"]["start_fingerprint"]
    assert manifest["extra"]["consistency_warnings"] == []
    assert list((opd_dir / "tensorboard").iterdir())

    # The exported model loads in transformers, differs from the start, and its log-probs
    # on a training sequence are those of the final Megatron checkpoint's weights.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(opd["hf_export"], dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(pipeline["student"], dtype=torch.float32)
    changed = [n for n, p in hf.named_parameters() if not torch.equal(p, start.state_dict()[n])]
    assert len(changed) == len(list(start.parameters()))
    assert manifest["extra"]["hf_fingerprint"].startswith("model-")
    r = pipeline["records"][0]
    assert torch.isfinite(token_logprobs(hf, r.prompt_ids.tolist(), r.response_ids.tolist())).all()


@pytest.fixture(scope="session")
def bad_stores(pipeline):
    """Stores that must be refused: another tokenizer, token ids past the model's vocabulary."""
    import dataclasses

    root, recs = pipeline["root"], pipeline["records"]
    names = ("other_tokenizer", "big_ids", "corrupted")
    if (root / "bad_stores.done").is_file():  # built already this session (another module imports this fixture)
        return {name: root / {"other_tokenizer": "other_tok"}.get(name, name) for name in names}
    fps = dict(teacher_fp=pipeline["fp_teacher"], tokenizer_fp=pipeline["fp_tokenizer"], policy_fp=pipeline["fp_student"])
    out = {"other_tokenizer": write_store(root / "other_tok", recs, **{**fps, "tokenizer_fp": "tok-someone-else"})}
    big = dataclasses.replace(recs[5], response_ids=np.where(np.arange(len(recs[5].response_ids)) == 2, 200, recs[5].response_ids).astype(np.int32))
    out["big_ids"] = write_store(root / "big_ids", [big if i == 5 else r for i, r in enumerate(recs)], **fps, vocab_size=256)
    # One flipped byte in the last shard's teacher log-probs: found before the first step, not at the last.
    out["corrupted"] = write_store(root / "corrupted", recs, **fps)
    chunk = max((p for p in (out["corrupted"] / "shards" / "000001" / "teacher_logprobs" / "c").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (root / "bad_stores.done").touch()
    assert set(out) == set(names)
    return out


def residualized_store(store, root: Path) -> str:
    from megatron_lopd.store.style import StyleConfig, residualize_store

    return residualize_store(store, root / "residualized.zarr", StyleConfig(folds=2, position_bins=1, surprisal_bins=1, min_count=1)).out


def _train_with_nan_sequence(overrides: list[str], nan_index: int):
    """Train on the configured store's sequences, but with NaN teacher log-probs for one of them.

    The store writer refuses NaN scores, so the bad sequence is injected through the data
    layer's in-memory source (the same TrainData the loop builds, same parameters).
    """
    import torch

    torch.set_num_threads(1)
    from megatron_lopd.runtime import destroy_distributed
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.data import InMemorySource, TrainData
    from megatron_lopd.errors import ArtifactError
    from megatron_lopd.training.loop import Trainer, check_teacher_scores

    trainer = Trainer(resolve_config("tiny_cpu", overrides))
    try:
        trainer.setup()
        d = trainer.data
        seqs = d.source.fetch(range(len(d)))
        seqs[nan_index].teacher_logprobs = np.full_like(seqs[nan_index].teacher_logprobs, np.nan)
        trainer.data = TrainData(
            InMemorySource(seqs), global_batch=d.global_batch, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
            seed=d.seed, dp_rank=d.dp_rank, dp_size=d.dp_size, with_teacher=True, top_k=d.top_k, with_rollout=d.with_rollout,
        )
        summary = trainer.run()
        try:  # what `train()` does after the run: skipped teacher steps fail the command
            check_teacher_scores(trainer.config, summary)
            error = None
        except ArtifactError as exc:
            error = str(exc)
        return {"records": summary.records, "nonfinite": summary.nonfinite_steps, "final_checkpoint": str(summary.final_checkpoint),
                "teacher_nonfinite": summary.teacher_nonfinite_steps, "error": error}
    finally:
        trainer.close()
        destroy_distributed()


def test_bad_input_and_nonfinite_steps(pipeline, bad_stores, tmp_path):
    """Clear errors before compute for inconsistent or unusable inputs; NaN steps skipped and counted."""
    from megatron_lopd.training.data import step_indices

    def run(name, **extra):
        return opd_overrides(pipeline, tmp_path / name, **extra)

    no_sft = {"data.sft_data": ""}
    cases = {
        "teacher_mismatch": run("a", **no_sft, **{"teacher_consistency.sft_data_generator": "model-another-teacher"}),
        "teacher_opt_out": run("b", **no_sft, **{"teacher_consistency.sft_data_generator": "model-another-teacher",
                                                  "teacher_consistency.allow_inconsistent_teacher": "true", "train_steps": 1}),
        "unknown_generator": run("c", **no_sft),
        "policy_mismatch": run("d", **{"model.start_from": pipeline["teacher"]}),
        "other_tokenizer": run("e", **{"data.store": bad_stores["other_tokenizer"]}),
        "too_long": run("f", **{"data.seq_length": 16}),
        "past_context": run("g", **{"data.seq_length": 1024}),
        "fp8_without_te": run("h", **{"model.fp8": "delayed"}),
        "ids_past_vocab": run("i", **{"data.store": bad_stores["big_ids"], "data.seed": 5}),
        "corrupted": run("l", **{"data.store": bad_stores["corrupted"]}),
        "diverged": run("k", **{"optimizer.lr": 1e30, "optimizer.clip_grad": 0, "max_consecutive_nonfinite": 3}),
        # Another teacher's scores, corrected for style (store.style): accepted without an opt-out.
        "teacher_residualized": run("m", **no_sft, **{"teacher_consistency.sft_data_generator": "model-another-teacher",
                                                      "data.store": residualized_store(pipeline["store"], tmp_path), "train_steps": 1}),
    }
    got = dict(zip(cases, run_distributed(_train_runs, world_size=1, runs=list(cases.values()))[0]))
    expect = {
        "teacher_mismatch": "ConsistencyError: teacher inconsistency: the store was scored by model-",
        "unknown_generator": "ConsistencyError: teacher consistency cannot be verified",
        "policy_mismatch": "ConsistencyError: policy mismatch: the rollouts were sampled by",
        "other_tokenizer": "ConsistencyError: tokenizer mismatch across stages",
        "too_long": "ConfigError: " + str(pipeline["store"]) + ": sequence",
        "past_context": "ConfigError: data.seq_length=1024 is longer than the model's context (512 positions)",
        "fp8_without_te": "ConfigError: FP8 requested, but Transformer Engine is not usable here",
        "ids_past_vocab": "ArtifactError: " + str(bad_stores["big_ids"]) + ": was scored with a vocabulary of 256 ids, the student has 128",
        "diverged": "TrainingStopped: training stopped at step 4: 3 steps in a row had a NaN/inf loss or gradient",
    }
    for name, prefix in expect.items():
        assert got[name].get("error", "").startswith(prefix), (name, got[name])
    assert "lower optimizer.lr" in got["diverged"]["error"]
    diverged = read_metrics(tmp_path / "k")
    assert [r["skipped"] for r in diverged] == [False, True, True, True] and diverged[-1]["nonfinite_steps"] == 3
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # refused before any step
    assert f"teacher store {bad_stores['corrupted']}: array 'teacher_logprobs' of shard 1" in got["corrupted"]["error"], got["corrupted"]
    assert got["corrupted"]["error"].startswith("ArtifactError: ") and "checksum error in inner chunk" in got["corrupted"]["error"]
    assert not (tmp_path / "l" / "metrics.jsonl").exists()

    assert "or correct this store for the teachers' style difference with `lopd store residualize" in got["teacher_mismatch"]["error"]
    assert "error" not in got["teacher_residualized"] and not got["teacher_residualized"]["warnings"]
    inputs = json.loads((tmp_path / "m" / "manifest.json").read_text())["inputs"]
    assert inputs["store_teacher_signal"] == "style_residualized" and inputs["style_residualized"]["parent_fingerprint"].startswith("store-")
    assert inputs["style_residualized"]["parent_store"] == str(Path(pipeline["store"]).resolve())

    # The research opt-out trains, says so in the run's metadata.
    assert "error" not in got["teacher_opt_out"] and got["teacher_opt_out"]["warnings"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["extra"]["consistency_opt_out"]["allow_inconsistent_teacher"] is True
    assert "teacher inconsistency" in manifest["extra"]["consistency_warnings"][0]

    # One sequence with NaN teacher scores: exactly the steps that contain it are skipped
    # (no update, no lr), counted, and training goes on.
    got = run_distributed(_train_with_nan_sequence, world_size=1, nan_index=3,
                          overrides=run("j", **{"train_steps": 6, "checkpoint.save_every": 6}))[0]
    rows = got["records"]
    bad_steps = [s + 1 for s in range(6) if 3 in step_indices(NUM_PROMPTS, 8 * s, 8, 1234)]
    assert [r["step"] for r in rows if r["skipped"]] == bad_steps and len(bad_steps) == 2
    assert all(r["lr"] is None and not math.isfinite(r["loss"]) and r["teacher_nonfinite"] > 0 for r in rows if r["skipped"])
    assert all(math.isfinite(r["loss"]) for r in rows if not r["skipped"])
    assert rows[-1]["nonfinite_steps"] == 2 and got["nonfinite"] == 2 and got["teacher_nonfinite"] == 2
    # ... and the command ends non-zero with one line naming the store (README: bad input never passes).
    assert got["error"].startswith(f"{pipeline['store']}: 2 training steps had NaN/inf teacher log-probs and were skipped")
    assert f"lopd store verify {pipeline['store']}" in got["error"]
    meta = json.loads((Path(got["final_checkpoint"]) / "lopd_checkpoint.json").read_text())
    assert meta["trainer"]["optimizer_updates"] == 4
    assert [r["loss"] is None for r in read_metrics(tmp_path / "j")] == [r["skipped"] for r in rows]  # strict JSON: null


def test_layouts_that_do_not_divide_are_refused(pipeline, tmp_path):
    """Heads by TP, layers by PP, batch by DP: clear errors before any compute (2 ranks)."""
    from megatron_lopd.models.tiny import write_random_hf_model

    odd = write_random_hf_model(tmp_path / "odd", seed=3, num_layers=3, num_heads=6, num_kv_heads=3)
    mismatch = {"model.start_from": odd, "teacher_consistency.allow_policy_mismatch": "true"}
    runs = [
        opd_overrides(pipeline, tmp_path / "tp", **mismatch, **{"parallel.tensor_parallel": 2}),
        opd_overrides(pipeline, tmp_path / "pp", **mismatch, **{"parallel.pipeline_parallel": 2}),
        opd_overrides(pipeline, tmp_path / "dp", **{"data.global_batch": 7}),
    ]
    results = run_distributed(_train_runs, world_size=2, runs=runs)
    for rank_results in results:  # every rank raises the same error
        tp, pp, dp = (r.get("error", "") for r in rank_results)
        assert tp == f"ConfigError: {odd}: TP=2 does not divide 3 key/value heads (fix: choose a parallel size that divides it (e.g. TP dividing the key/value heads, PP the layers))"
        assert pp.startswith(f"ConfigError: {odd}: PP=2 does not divide 3 layers")
        assert dp.startswith("ConfigError: data.global_batch=7 is not divisible by the data-parallel size 2")
    assert not any((tmp_path / d / "metrics.jsonl").exists() for d in ("tp", "pp", "dp"))


@pytest.mark.slow
def test_tensor_and_pipeline_parallel_match_one_process(pipeline, tmp_path):
    """TP=2 and PP=2 (two gloo ranks each) give the per-step losses and metrics of TP=1.

    Tolerance over 8 steps: rel 1e-5 or abs 2e-6 (the Lightning OPD loss is a sum of O(1)
    terms of both signs and can be near 0, so an absolute floor is needed). TP splits the
    matmuls and the vocabulary reductions, PP pads differently, so float32 sums happen in
    another order.
    """
    ref, recompute, dynamic = run_distributed(_train_runs, world_size=1, runs=[
        opd_overrides(pipeline, tmp_path / "tp1"),
        opd_overrides(pipeline, tmp_path / "recompute", **{"model.recompute": "full"}),
        opd_overrides(pipeline, tmp_path / "dynamic", **{"data.micro_batch_tokens": 48}),
    ])[0]
    assert recompute["losses"] == ref["losses"]  # activation recompute replays the same forward: bitwise
    # Dynamic batching cuts each step into other micro-batches: the same loss up to summation order.
    assert len(dynamic["records"]) == len(ref["records"])
    for key in ("loss", "kl_to_teacher", "grad_norm", "tokens"):
        assert [r[key] for r in dynamic["records"]] == pytest.approx([r[key] for r in ref["records"]], rel=1e-5, abs=2e-6), key
    tp2, pp2 = run_distributed(_train_runs, world_size=2, runs=[
        opd_overrides(pipeline, tmp_path / "tp2", **{"parallel.tensor_parallel": 2}),
        opd_overrides(pipeline, tmp_path / "pp2", **{"parallel.pipeline_parallel": 2, "data.micro_batch_size": 1}),
    ])[0]
    for other in (tp2, pp2):
        assert "error" not in other, other
        for key in ("loss", "kl_to_teacher", "grad_norm", "drift_chi2", "top1_agreement"):
            want = [r[key] for r in ref["records"]]
            got = [r[key] for r in other["records"]]
            assert got == pytest.approx(want, rel=1e-5, abs=2e-6), key
    # PP pads micro-batches to the full seq_length (fixed pipeline shapes), TP=1 trims them.
    assert all(r["tokens"] == q["tokens"] for r, q in zip(ref["records"], pp2["records"]))


def _gpu_ready() -> bool:
    from megatron_lopd.models.qwen3 import te_available

    return torch.cuda.is_available() and te_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 / Transformer Engine / FP8 paths)")
@pytest.mark.parametrize("fp8", ["", "delayed", "current"])
def test_gpu_bf16_and_fp8_steps(pipeline, tmp_path, fp8):
    """On a GPU: bf16 (Float16Module + fp32 main params), the TE spec with packed THD
    sequences, FP8 through TE with delayed or current scaling; losses stay finite and close
    to the fp32 CPU-style run (bf16 tolerance 5e-2 relative on step 1)."""
    if fp8 and not _gpu_ready():
        pytest.skip("FP8 needs Transformer Engine")
    ref = run_distributed(_train_runs, world_size=1, runs=[opd_overrides(pipeline, tmp_path / "fp32", **{"model.precision": "fp32", "train_steps": 2})])[0][0]
    extra = {"model.precision": "bf16", "train_steps": 2, "data.pad_to_multiple": 16}
    if fp8:
        extra["model.fp8"] = fp8
    got = run_distributed(_train_runs, world_size=1, runs=[opd_overrides(pipeline, tmp_path / "bf16", **extra)])[0][0]
    assert "error" not in got, got
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in got["records"])
    assert got["records"][0]["loss"] == pytest.approx(ref["records"][0]["loss"], rel=5e-2, abs=5e-2)
    assert got["records"][0]["mfu"] is not None and 0 < got["records"][0]["mfu"] < 1
