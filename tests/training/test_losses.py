"""Losses and metrics against an independent float64 full-vocabulary reference, TP=1 and TP=2.

The reference below is plain torch: log_softmax over the whole vocabulary in float64, the
coarse-grained top-k distributions summed out explicitly, and the "mean over each
sequence's tokens, then mean over sequences" written as a loop over sequences.
Tolerances (float32 compute vs float64): losses, metric sums and gradients w.r.t. the
logits within rtol 1e-5 / atol 1e-6 (observed ~1e-7); TP=2 against TP=1 within 1e-6.
Token chunks of the softmax pass against one pass: rtol 1e-6 / atol 1e-7 (the same float32
arithmetic per position; observed equal).
"""

import dataclasses
import math

import pytest
import torch

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.training.losses import TAIL_MIN_PROB, LossInputs, LossOptions, compute_loss, token_view
from tests.dist_utils import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)
CHUNK_TOL = dict(rtol=1e-6, atol=1e-7)
CASES = [  # (loss, options)
    ("lightning_opd", LossOptions()),
    ("lightning_opd", LossOptions(advantage_clip=0.5)),
    ("topk_reverse_kl", LossOptions()),
    ("topk_forward_kl", LossOptions()),
    ("sft", LossOptions()),
    ("sft", LossOptions(reduction="token_mean")),
]
# Row 0 packs sequences 0 and 1 then padding; row 1 holds sequence 2 and sequence 3, which
# has no loss tokens (prompt only). One more sequence lives in another micro-batch.
SEQ_IDS = [[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1], [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]]
LOSS_MASK = [[0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
NUM_SEQUENCES = 5


def make_batch(seed: int = 0, V: int = 24, k: int = 4) -> tuple[torch.Tensor, LossInputs, LossInputs]:
    """(student logits, batch with garbage where loss_mask == 0, the same batch cleaned)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(LOSS_MASK, dtype=torch.bool)
    B, T = mask.shape
    teacher = torch.randn(B, T, V, generator=g) * 2
    rollout = 0.7 * teacher + torch.randn(B, T, V, generator=g)  # R: near the teacher
    student = rollout + 0.3 * torch.randn(B, T, V, generator=g)  # S: drifted a little from R
    lp_t, lp_r = teacher.double().log_softmax(-1), rollout.double().log_softmax(-1)
    target = torch.multinomial(lp_r.exp().view(-1, V), 1, generator=g).view(B, T)
    topk_lp, topk_ids = lp_t.topk(k, -1)
    clean = LossInputs(
        target_ids=target,
        loss_mask=mask.float(),
        seq_ids=torch.tensor(SEQ_IDS),
        num_sequences=NUM_SEQUENCES,
        teacher_logprobs=lp_t.gather(-1, target[..., None])[..., 0].float(),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lp.float(),
        rollout_logprobs=lp_r.gather(-1, target[..., None])[..., 0].float(),
        num_loss_tokens=int(mask.sum()) + 3,
    )
    off = ~mask
    garbage = LossInputs(**{**clean.__dict__})
    garbage.target_ids = clean.target_ids.masked_fill(off, -100)
    garbage.teacher_logprobs = clean.teacher_logprobs.masked_fill(off, math.nan)
    garbage.teacher_topk_ids = clean.teacher_topk_ids.masked_fill(off[..., None], V + 7)
    garbage.teacher_topk_logprobs = clean.teacher_topk_logprobs.masked_fill(off[..., None], math.nan)
    garbage.rollout_logprobs = clean.rollout_logprobs.masked_fill(off, math.inf)
    return student, garbage, clean


def reference(name: str, logits: torch.Tensor, b: LossInputs, options: LossOptions = LossOptions()):
    """float64 over the full vocabulary: (loss, metric sums, d loss / d logits)."""
    z = logits.double().requires_grad_()
    lp = z.log_softmax(-1)
    mask = b.loss_mask.bool()
    lp_s = lp.gather(-1, b.target_ids[..., None])[..., 0]
    lp_t, lp_r = b.teacher_logprobs.double(), b.rollout_logprobs.double()
    ids, lp_tk = b.teacher_topk_ids, b.teacher_topk_logprobs.double()
    # Coarse-grained distributions: top-k ids + tail, the tail summed over the complement.
    in_k = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, ids, True)
    s_tail = lp.exp().masked_fill(in_k, 0).sum(-1).clamp_min(TAIL_MIN_PROB).log()
    t_tail = (1 - lp_tk.exp().sum(-1)).clamp_min(TAIL_MIN_PROB).log()
    s_coarse = torch.cat([lp.gather(-1, ids), s_tail[..., None]], -1)
    t_coarse = torch.cat([lp_tk, t_tail[..., None]], -1)
    reverse = (s_coarse.exp() * (s_coarse - t_coarse)).sum(-1)
    forward = (t_coarse.exp() * (t_coarse - s_coarse)).sum(-1)
    advantage = (lp_t - lp_s).detach()
    if options.advantage_clip:
        advantage = advantage.clamp(-options.advantage_clip, options.advantage_clip)
    token_loss = {"lightning_opd": -advantage * lp_s, "topk_reverse_kl": reverse, "topk_forward_kl": forward, "sft": -lp_s}[name]
    if options.reduction == "token_mean":
        loss = token_loss[mask].sum() / b.num_loss_tokens
    else:
        loss = 0
        for seq in b.seq_ids[mask].unique().tolist():
            in_seq = mask & (b.seq_ids == seq)
            loss = loss + token_loss[in_seq].mean()
        loss = loss / b.num_sequences
    (grad,) = torch.autograd.grad(loss, z)
    d_t, d_r = lp_s - lp_t, lp_s - lp_r
    w = d_r.exp()
    per_token = {
        "tokens": torch.ones_like(lp_s),
        "entropy_sum": -(lp.exp() * lp).sum(-1),
        "kl_to_teacher_sum": d_t,
        "reverse_kl_sum": (-d_t).exp() - 1 + d_t,
        "top1_agree_sum": (lp.argmax(-1) == ids[..., 0]).double(),
        "topk_reverse_kl_sum": reverse,
        "topk_forward_kl_sum": forward,
        "drift_chi2_sum": (w - 1) ** 2,
        "drift_kl_sum": w * w.log() - w + 1,
        "teacher_nonfinite": torch.zeros_like(lp_s),
    }
    metrics = {key: v.detach()[mask].sum() for key, v in per_token.items()}
    metrics["sequences"] = torch.tensor(float(b.seq_ids[mask].unique().numel()), dtype=torch.float64)
    return loss.detach(), metrics, grad


def run_loss(name, logits, inputs, options=LossOptions(), tp_group=None):
    leaf = logits.clone().requires_grad_()
    loss, metrics = compute_loss(name, leaf, inputs, tp_group=tp_group, options=options)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def assert_close_to_reference(got, ref, tol=TOL):
    loss, metrics, grad = got
    ref_loss, ref_metrics, ref_grad = ref
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key], **tol, msg=key)
    torch.testing.assert_close(grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("name,options", CASES)
def test_tp1_matches_float64_reference(name, options):
    logits, garbage, clean = make_batch()
    ref = reference(name, logits, clean, options)
    assert_close_to_reference(run_loss(name, logits, garbage, options), ref)
    # The data is not degenerate: some tokens agree with the teacher's top-1, some don't.
    assert 0 < ref[1]["top1_agree_sum"] < ref[1]["tokens"]
    assert torch.all(run_loss(name, logits, garbage, options)[2][torch.tensor(LOSS_MASK) == 0] == 0)
    if options.advantage_clip:  # the clip is active on this data
        assert not torch.isclose(ref[0], reference(name, logits, clean)[0])


def assert_same(got, expected, tol=CHUNK_TOL, what=""):
    torch.testing.assert_close(got[0], expected[0], **tol, msg=f"loss {what}")
    assert set(got[1]) == set(expected[1])
    for key in expected[1]:
        torch.testing.assert_close(got[1][key], expected[1][key], **tol, msg=f"{key} {what}")
    torch.testing.assert_close(got[2], expected[2], **tol, msg=f"gradient {what}")


def test_logit_chunks_give_the_one_pass_results():
    """Every loss, metric and gradient; chunks dividing the 24 positions or not, more chunks than positions."""
    logits, garbage, _ = make_batch(7)
    for name, options in CASES:
        one_pass = run_loss(name, logits, garbage, dataclasses.replace(options, logit_chunks=1))
        for chunks in (5, 7, 24, 100):
            got = run_loss(name, logits, garbage, dataclasses.replace(options, logit_chunks=chunks))
            assert_same(got, one_pass, what=f"{name}, {chunks} chunks")
    with pytest.raises(ConfigError, match="logit chunks 0 must be a positive integer"):
        LossOptions(logit_chunks=0)


def test_lightning_opd_gradient_is_that_of_half_squared_error():
    logits, garbage, clean = make_batch(1)
    loss, _, grad = run_loss("lightning_opd", logits, garbage)
    z = logits.double().requires_grad_()
    lp_s = z.log_softmax(-1).gather(-1, clean.target_ids[..., None])[..., 0]
    mask = clean.loss_mask.bool()
    half_sq = 0.5 * (lp_s - clean.teacher_logprobs.double()) ** 2
    total = sum(half_sq[mask & (clean.seq_ids == s)].mean() for s in (0, 1, 2)) / NUM_SEQUENCES
    (ref_grad,) = torch.autograd.grad(total, z)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    assert not torch.isclose(loss.double(), total.detach())  # the value is -A lpS, not the squared error


def test_micro_batches_and_split_sequences_add_up():
    """Contributions of micro-batches sum to the global loss; split sequences need seq_num_tokens."""
    logits, garbage, clean = make_batch(2)
    whole = run_loss("lightning_opd", logits, garbage)

    def part(rows=slice(None), cols=slice(None), lengths=None):
        fields = {k: v[rows, cols] if isinstance(v, torch.Tensor) else v for k, v in garbage.__dict__.items()}
        fields["seq_num_tokens"] = None if lengths is None else lengths[rows, cols]
        return run_loss("lightning_opd", logits[rows, cols], LossInputs(**fields))

    by_rows = [part(rows=slice(0, 1)), part(rows=slice(1, 2))]
    torch.testing.assert_close(sum(p[0] for p in by_rows), whole[0], **TOL)
    torch.testing.assert_close(torch.cat([p[2] for p in by_rows]), whole[2], **TOL)
    # Columns 0-5 / 6-11 split sequences 1 and 2 across micro-batches.
    mask = clean.loss_mask.bool()
    lengths = torch.zeros(mask.shape)
    for seq in (0, 1, 2):
        lengths[clean.seq_ids == seq] = float((mask & (clean.seq_ids == seq)).sum())
    split = [part(cols=slice(0, 6), lengths=lengths), part(cols=slice(6, 12), lengths=lengths)]
    torch.testing.assert_close(sum(p[0] for p in split), whole[0], **TOL)
    torch.testing.assert_close(torch.cat([p[2] for p in split], 1), whole[2], **TOL)
    naive = part(cols=slice(0, 6))[0] + part(cols=slice(6, 12))[0]
    assert not torch.isclose(naive, whole[0], rtol=1e-3)


def test_empty_batch_and_tail_edge_cases_stay_finite():
    logits, garbage, clean = make_batch(3)
    # No loss token at all: zero loss, zero gradient, no NaN.
    empty = LossInputs(**{**garbage.__dict__, "loss_mask": torch.zeros_like(garbage.loss_mask)})
    for name, options in CASES[:5]:
        loss, metrics, grad = run_loss(name, logits, empty, options)
        assert loss == 0 and torch.all(grad == 0) and metrics["tokens"] == 0
        assert all(torch.isfinite(v) for v in metrics.values())

    # Top-k holding all but ~1e-6 of both distributions: the tail is exact, not cancellation noise.
    peaked_logits = logits.clone()
    peaked_logits.scatter_(-1, clean.teacher_topk_ids, 16.0)
    peaked_teacher = clean.teacher_topk_logprobs.clone()
    peaked_teacher[..., :] = math.log((1 - 3e-6) / peaked_teacher.shape[-1])
    clean.teacher_topk_logprobs = garbage.teacher_topk_logprobs = peaked_teacher
    view = token_view(peaked_logits, garbage)
    z = peaked_logits.double()
    in_k = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, clean.teacher_topk_ids, True)
    exact_tail = z.masked_fill(in_k, -torch.inf).logsumexp(-1) - z.logsumexp(-1)
    mask = clean.loss_mask.bool()
    assert exact_tail[mask].max() < math.log(1e-5)
    torch.testing.assert_close(view.student_coarse[..., -1][mask].double(), exact_tail[mask], rtol=0, atol=2e-5)
    for name in ("topk_reverse_kl", "topk_forward_kl"):
        assert_close_to_reference(run_loss(name, peaked_logits, garbage), reference(name, peaked_logits, clean))

    # fp16-stored teacher top-k summing above 1: tail at the floor, finite losses and grads.
    over = (clean.teacher_topk_logprobs + 2e-3).half().float()
    assert (over.exp().sum(-1) > 1).all()
    clean.teacher_topk_logprobs = garbage.teacher_topk_logprobs = over
    view = token_view(logits, garbage)
    assert torch.allclose(view.teacher_coarse[..., -1][mask], torch.tensor(math.log(TAIL_MIN_PROB)))
    for name in ("topk_reverse_kl", "topk_forward_kl"):
        got = run_loss(name, logits, garbage)
        assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
        assert_close_to_reference(got, reference(name, logits, clean))


def test_nan_teacher_on_a_loss_token_propagates_and_is_counted():
    """The trainer detects a bad store through a non-finite loss and `teacher_nonfinite`."""
    logits, garbage, _ = make_batch(4)
    garbage.teacher_logprobs = garbage.teacher_logprobs.clone()
    garbage.teacher_logprobs[1, 3] = math.nan  # a loss token
    garbage.teacher_topk_logprobs = garbage.teacher_topk_logprobs.clone()
    garbage.teacher_topk_logprobs[0, 2, 1] = math.nan
    for name in ("lightning_opd", "topk_reverse_kl", "topk_forward_kl"):
        loss, metrics, grad = run_loss(name, logits, garbage)
        assert torch.isnan(loss) and not torch.isfinite(grad).all(), name
        assert metrics["teacher_nonfinite"] == 2
    loss, metrics, grad = run_loss("sft", logits, garbage)  # sft does not read the teacher
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and metrics["teacher_nonfinite"] == 2


def test_bad_batches_raise_one_line_errors():
    logits, garbage, _ = make_batch(5)
    no_teacher = LossInputs(garbage.target_ids, garbage.loss_mask, garbage.seq_ids, NUM_SEQUENCES)
    on_padding = LossInputs(**{**garbage.__dict__, "loss_mask": torch.ones_like(garbage.loss_mask)})
    bad_target = LossInputs(**{**garbage.__dict__, "target_ids": garbage.target_ids.masked_fill(garbage.loss_mask.bool(), 24)})
    short = LossInputs(**{**garbage.__dict__, "seq_ids": garbage.seq_ids[:, :5]})
    checks = [
        (ConfigError, "unknown loss 'ppo'", dict(name="ppo")),
        (ConfigError, "needs teacher_logprobs", dict(inputs=no_teacher)),
        (ConfigError, "needs teacher_topk_ids, teacher_topk_logprobs", dict(name="topk_forward_kl", inputs=no_teacher)),
        (ArtifactError, r"loss tokens on padding \(seq_id -1\)", dict(inputs=on_padding)),
        (ConfigError, r"token ids span \[\d+, 24\], outside the vocabulary \[0, 24\)", dict(inputs=bad_target)),
        (ConfigError, r"seq_ids has shape \(2, 5\)", dict(inputs=short)),
        (ConfigError, "advantage_clip applies to lightning_opd only", dict(name="sft", options=LossOptions(advantage_clip=1.0))),
        (ConfigError, "token_mean without num_loss_tokens", dict(inputs=no_teacher, name="sft", options=LossOptions(reduction="token_mean"))),
    ]
    for error, message, override in checks:
        kwargs = dict(name="lightning_opd", inputs=garbage, options=LossOptions()) | override
        with pytest.raises(error, match=message):
            compute_loss(kwargs["name"], logits, kwargs["inputs"], options=kwargs["options"])
    with pytest.raises(ConfigError, match="unknown loss reduction 'mean'"):
        LossOptions(reduction="mean")


def _tp2_worker(seed: int) -> dict:
    from megatron.core import parallel_state

    from megatron_lopd.runtime import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, garbage, _ = make_batch(seed)
    local = logits.chunk(2, -1)[rank]  # this rank's vocabulary half, as Megatron's output layer leaves it
    out = {}
    for i, (name, options) in enumerate(CASES):
        loss, metrics, grad = run_loss(name, local, garbage, options, tp_group=group)
        out[i] = (loss.numpy(), {k: v.numpy() for k, v in metrics.items()}, grad.numpy())
        loss, metrics, grad = run_loss(name, local, garbage, dataclasses.replace(options, logit_chunks=5), tp_group=group)
        out["chunked", i] = (loss.numpy(), {k: v.numpy() for k, v in metrics.items()}, grad.numpy())
    try:
        compute_loss("sft", local, garbage)  # forgetting the group must not normalise over half the vocab
        out["guard"] = "no error"
    except ConfigError as e:
        out["guard"] = str(e)
    destroy_distributed()  # before returning: results are plain numpy, the launcher imports nothing more
    return out


def test_tp2_matches_float64_reference_and_tp1():
    seed = 6
    ranks = run_distributed(_tp2_worker, world_size=2, seed=seed)
    logits, garbage, clean = make_batch(seed)
    for i, (name, options) in enumerate(CASES):
        (loss0, metrics0, grad0), (loss1, metrics1, grad1) = ranks[0][i], ranks[1][i]
        assert loss0 == loss1 and metrics0 == metrics1  # replicated across the TP group
        got = (torch.from_numpy(loss0), {k: torch.from_numpy(v) for k, v in metrics0.items()},
               torch.cat([torch.from_numpy(grad0), torch.from_numpy(grad1)], -1))
        assert_close_to_reference(got, reference(name, logits, clean, options))
        single = run_loss(name, logits, garbage, options)
        torch.testing.assert_close(got[0], single[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[2], single[2], rtol=1e-6, atol=1e-6)
        # 5 token chunks (5, 5, 5, 5, 4 positions) on each rank: the TP=2 results of the default chunks.
        (loss0, metrics0, grad0), (_, _, grad1) = ranks[0]["chunked", i], ranks[1]["chunked", i]
        chunked = (torch.from_numpy(loss0), {k: torch.from_numpy(v) for k, v in metrics0.items()},
                   torch.cat([torch.from_numpy(grad0), torch.from_numpy(grad1)], -1))
        assert_same(chunked, got, what=f"{name}, TP=2, 5 chunks")
    assert "tp_group=None but tensor-parallel size is 2" in ranks[0]["guard"]
