"""Micro-batches: prompt masking, alignment, packing, DP partition, shuffle, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.training.data import (
    InMemorySource,
    TrainData,
    TrainSequence,
    block_causal_mask,
    epoch_order,
    pack_rows,
    split_across_ranks,
    step_indices,
)


def synthetic_sequences(n=40, vocab=100, k=4, seed=0, max_prompt=9, max_response=20):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        P, R = int(rng.integers(0, max_prompt)), int(rng.integers(1, max_response))
        out.append(TrainSequence(
            index=i,
            prompt_ids=rng.integers(2, vocab, P).astype(np.int32),
            response_ids=rng.integers(2, vocab, R).astype(np.int32),
            teacher_logprobs=-rng.random(R).astype(np.float32) - 0.01,
            topk_ids=rng.integers(0, vocab, (R, k)).astype(np.int32),
            topk_logprobs=-rng.random((R, k)).astype(np.float32),
            rollout_logprobs=-rng.random(R).astype(np.float32) - 0.01,
        ))
    return out


def make_data(seqs, **kw):
    args = dict(global_batch=8, seq_length=32, micro_batch_size=2, seed=7, with_teacher=True, top_k=4, with_rollout=True)
    args.update(kw)
    return TrainData(InMemorySource(seqs), **args)


def unpack(mb):
    """Independent reading of a micro-batch: per sequence, the positions it occupies in order."""
    out = {}
    for b in range(mb.seq_ids.shape[0]):
        for sid in torch.unique(mb.seq_ids[b]).tolist():
            if sid >= 0:
                out[sid] = (b, torch.nonzero(mb.seq_ids[b] == sid).flatten())
    return out


def check_alignment(mb, seqs_by_index):
    """Every sequence appears whole; inputs/targets are the shifted tokens; only response
    targets are in the loss; teacher/top-k/rollout values sit on the position whose logits
    predict that response token (position P + t - 1)."""
    assert len(mb.sequence_indices) == len(unpack(mb))
    for sid, (b, pos) in unpack(mb).items():
        seq = seqs_by_index[mb.sequence_indices[sid]]
        P = len(seq.prompt_ids)
        full = np.concatenate([seq.prompt_ids, seq.response_ids]).astype(np.int64)
        assert torch.equal(pos, torch.arange(pos[0], pos[0] + len(full) - 1))  # contiguous, whole
        assert mb.input_ids[b, pos].tolist() == full[:-1].tolist()
        assert mb.target_ids[b, pos].tolist() == full[1:].tolist()
        assert mb.position_ids[b, pos].tolist() == list(range(len(full) - 1))
        for j, p in enumerate(pos.tolist()):
            t = j + 1 - P  # the response index of the target at local position j
            if t >= 0:
                assert mb.loss_mask[b, p] == 1
                assert mb.target_ids[b, p] == int(seq.response_ids[t])
                assert mb.teacher_logprobs[b, p] == float(seq.teacher_logprobs[t])
                assert mb.rollout_logprobs[b, p] == float(seq.rollout_logprobs[t])
                assert mb.teacher_topk_ids[b, p].tolist() == seq.topk_ids[t].tolist()
                assert torch.equal(mb.teacher_topk_logprobs[b, p], torch.from_numpy(seq.topk_logprobs[t]))
                if mb.teacher_top1_ids is not None:
                    assert mb.teacher_top1_ids[b, p] == int(seq.topk_ids[t][np.argmax(seq.topk_logprobs[t])])
            else:  # prompt targets are masked out of the loss
                assert mb.loss_mask[b, p] == 0
    pad = mb.seq_ids == -1
    assert mb.loss_mask[pad].sum() == 0 and mb.teacher_logprobs[pad].abs().sum() == 0


def test_shuffle_is_a_pure_function_of_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=0))
    assert np.array_equal(epoch_order(5, 3, 0, shuffle=False), np.arange(5))
    # The stream: 3 epochs of 50 read in batches of 16 cover each epoch exactly once.
    stream = np.concatenate([step_indices(50, c, 16, seed=3) for c in range(0, 144, 16)])
    for e in range(2):
        assert np.array_equal(stream[50 * e : 50 * (e + 1)], epoch_order(50, 3, e))


def test_dp_split_disjoint_equal_counts_balanced():
    lengths = np.random.default_rng(1).integers(5, 500, 64)
    idx = np.arange(64)[::-1].copy()
    parts = split_across_ranks(idx, lengths, 4)
    assert sorted(np.concatenate(parts).tolist()) == list(range(64))
    assert [len(p) for p in parts] == [16] * 4
    loads = [int(lengths[p].sum()) for p in parts]
    assert max(loads) - min(loads) <= lengths.max()
    with pytest.raises(ConfigError, match="does not divide across 3"):
        split_across_ranks(idx, lengths, 3)


def test_packing_never_splits_and_respects_the_budget():
    lengths = np.random.default_rng(2).integers(2, 33, 100)
    rows = pack_rows(np.arange(100), lengths, seq_length=32)
    assert sorted(i for r in rows for i in r) == list(range(100))
    assert all(sum(lengths[i] - 1 for i in r) <= 32 for r in rows)
    assert len(rows) < 100  # actually packed
    assert all(len(r) == 1 for r in pack_rows(np.arange(100), lengths, 32, pack=False))


@pytest.mark.parametrize("pack", [True, False])
def test_micro_batches_alignment_and_prompt_mask(pack):
    seqs = synthetic_sequences()
    by_index = {s.index: s for s in seqs}
    data = make_data(seqs, pack=pack, with_top1=True)
    for _ in range(3):
        step = data.next_step()
        seen = []
        for mb in step.micro_batches:
            assert mb.input_ids.shape == (2, step.row_length) and mb.num_sequences == 8
            check_alignment(mb, by_index)
            seen += mb.sequence_indices
        assert sorted(seen) == sorted(step.rank_indices.tolist())  # each sequence once, none split
        assert step.loss_tokens == sum(len(by_index[i].response_ids) - (len(by_index[i].prompt_ids) == 0) for i in seen)


def test_dynamic_batching_rows_hold_the_token_budget_and_the_same_sequences():
    """data.micro_batch_tokens: one row per micro-batch, each trimmed to what it holds (rounded to
    the row multiple), at most the budget unless a single sequence is longer; the step's sequences,
    tokens and loss tokens are those of fixed rows; per-sequence positions are recorded (MFU)."""
    seqs = synthetic_sequences(n=40, max_prompt=9, max_response=30)
    by_index = {s.index: s for s in seqs}
    positions = {s.index: len(s.prompt_ids) + len(s.response_ids) - 1 for s in seqs}
    fixed = make_data(seqs, seq_length=40, micro_batch_size=2)
    dynamic = make_data(seqs, seq_length=40, micro_batch_size=2, micro_batch_tokens=24, pad_to_multiple=8)
    for _ in range(4):
        a, b = fixed.next_step(), dynamic.next_step()
        assert np.array_equal(a.rank_indices, b.rank_indices) and (a.tokens, a.loss_tokens) == (b.tokens, b.loss_tokens)
        assert sorted(b.sequence_tokens) == sorted(positions[int(i)] for i in b.rank_indices)
        for mb in b.micro_batches:
            check_alignment(mb, by_index)
            held = [positions[i] for i in mb.sequence_indices]
            assert mb.input_ids.shape[0] == 1 and mb.input_ids.shape[1] == -(-sum(held) // 8) * 8
            assert sum(held) <= 24 or len(held) == 1
        assert b.row_length == max(mb.input_ids.shape[1] for mb in b.micro_batches)
        assert sorted(i for mb in b.micro_batches for i in mb.sequence_indices) == sorted(b.rank_indices.tolist())


def test_block_causal_mask_matches_a_loop():
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]])
    mask = block_causal_mask(seq_ids)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                allowed = j <= i and seq_ids[b, i] == seq_ids[b, j]
                assert bool(mask[b, 0, i, j]) == (not allowed)


def test_dp_partition_and_resume_are_exact():
    seqs = synthetic_sequences(n=30)
    single = make_data(seqs, micro_batch_size=1)
    ranks = [make_data(seqs, dp_rank=r, dp_size=2, micro_batch_size=1) for r in range(2)]
    for _ in range(6):  # crosses an epoch boundary (30 sequences, 8 per step)
        whole = single.next_step()
        parts = [d.next_step() for d in ranks]
        assert not set(parts[0].rank_indices.tolist()) & set(parts[1].rank_indices.tolist())
        assert sorted(np.concatenate([p.rank_indices for p in parts]).tolist()) == sorted(whole.global_indices.tolist())
        assert all(np.array_equal(p.global_indices, whole.global_indices) for p in parts)
    # Resume: a fresh reader given the saved position builds bit-identical next steps.
    state = single.state_dict()
    expected = single.next_step()
    resumed = make_data(seqs, micro_batch_size=1)
    resumed.load_state_dict(state)
    got = resumed.next_step()
    assert state["consumed"] == 48 and np.array_equal(got.global_indices, expected.global_indices)
    for a, b in zip(got.micro_batches, expected.micro_batches):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "target_ids", "loss_mask", "teacher_logprobs"))
    # The reader refuses a position from a different data set.
    with pytest.raises(ArtifactError, match="checkpoint was trained on 99"):
        resumed.load_state_dict({**state, "num_sequences": 99})


def test_prefetch_gives_the_same_batches():
    seqs = synthetic_sequences(n=30)
    plain, ahead = make_data(seqs), make_data(seqs, prefetch=True)
    try:
        for _ in range(4):
            a, b = plain.next_step(), ahead.next_step()
            assert np.array_equal(a.rank_indices, b.rank_indices)
            assert torch.equal(a.micro_batches[0].input_ids, b.micro_batches[0].input_ids)
    finally:
        ahead.close()


def test_bad_input_is_refused_before_compute():
    seqs = synthetic_sequences(n=16)
    with pytest.raises(ConfigError, match=r"sequence \d+ has \d+ tokens, more than data.seq_length=8"):
        make_data(seqs, seq_length=8)
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 3"):
        make_data(seqs, global_batch=8, dp_size=3)
    with pytest.raises(ArtifactError, match="outside the model's vocabulary of 50"):
        make_data(seqs, vocab_size=50).next_step()
    no_teacher = [TrainSequence(s.index, s.prompt_ids, s.response_ids) for s in seqs]
    with pytest.raises(ArtifactError, match="no teacher log-probs"):
        make_data(no_teacher, top_k=0, with_rollout=False)
    with pytest.raises(ArtifactError, match="the loss needs top-8"):
        make_data(seqs, top_k=8)


def test_alignment_against_the_teacher_store(tmp_path):
    """Micro-batches built from a real (zarr) teacher store carry, on the position whose
    logits predict response token t, exactly the store's teacher / top-k / rollout values for t."""
    from megatron_lopd.store import StoreProvenance, StoreWriter, SyntheticSpec, TeacherStore, finalize_store, synthetic_records
    from megatron_lopd.training.data import StoreSource

    spec = SyntheticSpec(vocab_size=500, top_k=4, prompt_len=(1, 12), response_len=(1, 30), response_len_median=12, seed=3)
    records = synthetic_records(range(20), spec)
    prov = StoreProvenance(teacher_fingerprint="model-t", tokenizer_fingerprint="tok-x", rollout_generator_fingerprint="model-r")
    w = StoreWriter.create(tmp_path / "store", num_sequences=20, top_k=4, vocab_size=500, provenance=prov,
                           sequences_per_shard=8, has_rollout_logprobs=True)
    for shard in w.pending_shards():
        w.write_shard(shard, [records[i] for i in w.shard_range(shard)])
    finalize_store(tmp_path / "store")

    source = StoreSource.open(tmp_path / "store")
    assert source.top_k == 4 and source.has_rollout_logprobs and len(source) == 20
    reference = TeacherStore.open(tmp_path / "store")  # an independent reader
    by_index = {}
    for i in range(20):
        r = reference[i]
        by_index[i] = TrainSequence(i, r.prompt_ids, r.response_ids, r.teacher_logprobs, np.ascontiguousarray(r.topk_ids),
                                    np.ascontiguousarray(r.topk_logprobs), r.rollout_logprobs)
        assert source.lengths()[i] == len(r.prompt_ids) + len(r.response_ids)
    data = TrainData(source, global_batch=10, seq_length=48, micro_batch_size=2, seed=1, top_k=4, with_rollout=True, vocab_size=500)
    for _ in range(2):
        step = data.next_step()
        for mb in step.micro_batches:
            check_alignment(mb, by_index)
    assert StoreSource.open(tmp_path / "store", load_topk=False).top_k == 0
