"""The trainer's losses and the per-token metrics logged with them, on vocab-parallel logits.

Layout: `logits` is what megatron-core 0.16.1 `GPTModel.forward(..., labels=None)` returns,
`[B, T, V_local]` (it transposes its internal `[T, B, V]`), with V_local = padded vocab / TP
on each tensor-parallel rank. All per-position inputs are `[B, T]` (top-k: `[B, T, k]`),
aligned with the logits: position t's logits predict `target_ids[:, t]`.
Log-probs are at temperature 1 (raw logits), normalised over the full vocabulary
(`vocab_parallel_log_probs`; no rank ever holds more than its own columns). That pass is
the only vocabulary-sized work of every loss; it runs in `LossOptions.logit_chunks` token
chunks, forward and backward, so its temporaries beyond the logits and their gradient stay
at ~0.3x the float32 logits at the default 8 (benchmarks/bench_loss_memory.py).

Losses (per response token, then reduced; `LOSSES` maps each name to its `LossSpec`: the
token loss and what it reads):
- `lightning_opd` (the paper's default, DESIGN section 1): A = stopgrad(lpT - lpS),
  token loss -A * lpS, so the gradient is that of 0.5 * (lpS - lpT)**2. The loss *value*
  is -A * lpS, not the squared error. `LossOptions.advantage_clip=c` clips A to [-c, c]:
  beyond the paper (the demo prototype trained more stably with c = 1); default None.
- `topk_reverse_kl` / `topk_forward_kl` (beyond the paper): exact KL between the
  coarse-grained distributions over the teacher's stored top-k ids plus one tail bucket,
  teacher and student both normalised over the full vocabulary. The student's tail
  log-mass is computed exactly (the top-k columns are left out of a second sum-exp, no
  `1 - sum` cancellation); the teacher's is log(1 - sum exp(lpT_K)) from the stored
  log-probs. Both tails are floored at TAIL_MIN_PROB: fp16-stored teacher log-probs can
  sum above 1 (then the teacher tail is the floor, not NaN), and a student tail below the
  floor carries no gradient.
- `sft`: cross-entropy -lpS on target_ids.

Reduction. `sequence_mean` (default, the paper's): each loss token gets the weight
1 / (len(seq) * num_sequences), len(seq) the number of loss tokens of its sequence, so
summing the returned contributions over micro-batches and data-parallel ranks gives
exactly "mean over each sequence's tokens, then mean over the global batch's
sequences". len(seq) is counted in the micro-batch from `seq_ids`, which assumes the data
layer never splits a sequence across micro-batches; a layout that does must pass
`seq_num_tokens` (each position's sequence length over the whole batch). seq_ids only
need to be distinct between the sequences of one micro-batch (rows included). A sequence
without loss tokens contributes nothing (no 0/0) but still counts in num_sequences if the
data layer counts it. `token_mean`: weight 1 / num_loss_tokens (global count, required).
The contribution is already globally normalised: a DDP that averages gradients over DP
ranks must be compensated by the caller (multiply by the DP size), or set up to sum.

Metrics (`metric_sums`): additive sums over this micro-batch's loss tokens, detached
float32; the trainer all-reduces them and divides by `tokens`:
- `tokens`, `sequences` (sequences with >= 1 loss token), `entropy_sum` (student).
- with teacher_logprobs: `kl_to_teacher_sum` = sum(lpS - lpT) of the sampled tokens
  (before the update); `reverse_kl_sum` = sum of k3 = (r - 1) - log r, r = exp(lpT - lpS),
  the non-negative low-variance estimate of KL(S || T), unbiased when tokens come from S
  (they come from R; S == R at step 0, the drift metrics say how far that holds);
  `teacher_nonfinite` = loss tokens whose teacher log-prob(s) are NaN or infinite.
- with teacher top-k (or only its top-1 ids, `teacher_top1_ids`): `top1_agree_sum` (student
  argmax == the teacher's most likely stored id); with top-k also `topk_reverse_kl_sum`,
  `topk_forward_kl_sum` (the coarse-grained KLs above).
- with rollout_logprobs (R's log-prob at rollout time), w = exp(lpS - lpR):
  `drift_chi2_sum` = sum (w - 1)**2 (unbiased for chi2(S || R) since tokens are drawn from
  R) and `drift_kl_sum` = sum (w log w - w + 1), unbiased for KL(S || R) under samples from R
  (E_R[w log w] = KL(S||R) and E_R[w - 1] = 0 as a control variate), >= 0 per token. (The
  k3 form with r = exp(lpR - lpS) would be unbiased only for samples from S.)

Bad values. Garbage at positions with loss_mask 0 (any target id, NaN teacher values) is
replaced before use and never reaches the loss or the gradient. A NaN or infinite teacher
log-prob on a loss token propagates: the returned loss and its gradient become non-finite
and `teacher_nonfinite` counts it, identically on every rank of the TP group, so the
trainer detects it after its all-reduce (check `torch.isfinite(loss)` or the count) and
stops with an error naming the store, rather than one rank raising inside a collective.
Malformed batches (shapes, ids outside the vocabulary, loss tokens on padding, missing
teacher data for the chosen loss) raise a `LopdError` at once.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.training.vocab_parallel import LOGIT_CHUNKS, VocabShard, check_chunks, vocab_parallel_log_probs

TAIL_MIN_PROB = 1e-8
LOG_TAIL_MIN_PROB = math.log(TAIL_MIN_PROB)
REDUCTIONS = ("sequence_mean", "token_mean")
# The trainer's per-step metrics: name -> the metric sum (below) divided by `tokens`.
TOKEN_MEANS = {
    "kl_to_teacher": "kl_to_teacher_sum",
    "reverse_kl": "reverse_kl_sum",
    "top1_agreement": "top1_agree_sum",
    "drift_chi2": "drift_chi2_sum",
    "drift_kl": "drift_kl_sum",
    "entropy": "entropy_sum",
}


@dataclass
class LossInputs:
    """One micro-batch, token-aligned with the logits (see the module docstring)."""

    target_ids: Tensor  # [B, T] long, already shifted; any value where loss_mask == 0
    loss_mask: Tensor  # [B, T] bool/float, 1 on response tokens
    seq_ids: Tensor  # [B, T] long, sequence of each position (-1: padding)
    num_sequences: int  # sequences in the GLOBAL batch (all micro-batches, all DP ranks)
    teacher_logprobs: Tensor | None = None  # [B, T] teacher log-prob of target_ids
    teacher_topk_ids: Tensor | None = None  # [B, T, k] long
    teacher_topk_logprobs: Tensor | None = None  # [B, T, k]
    rollout_logprobs: Tensor | None = None  # [B, T] R's log-prob of target_ids (drift monitor)
    teacher_top1_ids: Tensor | None = None  # [B, T] the teacher's most likely id (agreement metric), without top-k
    num_loss_tokens: int | None = None  # loss tokens in the GLOBAL batch (token_mean only)
    seq_num_tokens: Tensor | None = None  # [B, T] len(seq) over the whole batch, if sequences are split


@dataclass(frozen=True)
class LossOptions:
    advantage_clip: float | None = None  # lightning_opd only; None = paper-faithful
    reduction: str = "sequence_mean"  # or "token_mean"
    vocab_size: int | None = None  # real vocabulary when Megatron padded the output layer
    # Token chunks of the vocabulary-sized softmax work: memory only, the results do not
    # depend on it (training/vocab_parallel.py); 1 = all tokens at once (2.25x the fp32 logits).
    logit_chunks: int = LOGIT_CHUNKS

    def __post_init__(self):
        check_chunks(self.logit_chunks)
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"unknown loss reduction {self.reduction!r}", f"use one of {', '.join(REDUCTIONS)}")
        if self.advantage_clip is not None and not self.advantage_clip > 0:
            raise ConfigError(f"advantage_clip {self.advantage_clip} must be positive", "use e.g. 1.0, or None for no clip")


@dataclass
class TokenView:
    """Per-position quantities the losses read. Teacher values are cleaned at mask == 0."""

    mask: Tensor  # [B, T] bool
    student: Tensor  # [B, T] lpS of target_ids, differentiable
    argmax: Tensor  # [B, T] student argmax id
    entropy: Tensor  # [B, T] student entropy
    teacher: Tensor | None  # [B, T] lpT
    student_coarse: Tensor | None  # [B, T, k + 1] lpS over top-k ids + tail, differentiable
    teacher_coarse: Tensor | None  # [B, T, k + 1] lpT over top-k ids + tail
    teacher_top1: Tensor | None  # [B, T] the teacher's most likely stored id
    rollout: Tensor | None  # [B, T] lpR


def lightning_opd(v: TokenView, options: LossOptions) -> Tensor:
    advantage = (v.teacher - v.student).detach()
    if options.advantage_clip is not None:
        advantage = advantage.clamp(-options.advantage_clip, options.advantage_clip)
    return -advantage * v.student


def coarse_kl(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """KL(p || q) = sum p (log p - log q) over the last dim; entries with p = 0 (-inf) add 0, NaN stays NaN."""
    return torch.where(lp_p == -math.inf, 0, lp_p.exp() * (lp_p - lp_q)).sum(-1)


def topk_reverse_kl(v: TokenView, options: LossOptions) -> Tensor:
    return coarse_kl(v.student_coarse, v.teacher_coarse)


def topk_forward_kl(v: TokenView, options: LossOptions) -> Tensor:
    return coarse_kl(v.teacher_coarse, v.student_coarse)


def sft(v: TokenView, options: LossOptions) -> Tensor:
    return -v.student


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs, so that no code outside this module tests loss names."""

    name: str
    token_loss: Callable[[TokenView, LossOptions], Tensor]
    data: str  # the config field it reads: "sft_data" (an SFT artifact) or "store" (a teacher store)
    teacher_fields: tuple[str, ...] = ()  # LossInputs fields it reads (beyond the targets)
    clippable: bool = False  # takes LossOptions.advantage_clip

    @property
    def distills(self) -> bool:
        """Trains towards a teacher (reads teacher log-probs), rather than imitating data."""
        return self.data == "store"

    @property
    def needs_topk(self) -> bool:
        return "teacher_topk_ids" in self.teacher_fields


_TOPK = ("teacher_topk_ids", "teacher_topk_logprobs")
LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("lightning_opd", lightning_opd, "store", ("teacher_logprobs",), clippable=True),
        LossSpec("topk_reverse_kl", topk_reverse_kl, "store", _TOPK),
        LossSpec("topk_forward_kl", topk_forward_kl, "store", _TOPK),
        LossSpec("sft", sft, "sft_data"),
    )
}


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}", f"use one of {', '.join(LOSSES)}")
    return LOSSES[name]


def compute_loss(
    name: str,
    logits: Tensor,
    inputs: LossInputs,
    *,
    tp_group=None,
    options: LossOptions = LossOptions(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss contribution of this micro-batch, metric sums); see the module docstring.

    `tp_group`: the tensor-parallel group whose ranks hold the vocabulary shards of
    `logits` (`parallel_state.get_tensor_model_parallel_group()`); None = no TP.
    """
    spec = loss_spec(name)
    missing = [field for field in spec.teacher_fields if getattr(inputs, field) is None]
    if missing:
        raise ConfigError(
            f"loss {name!r} needs {', '.join(missing)}, which this batch lacks",
            "score the rollouts with the teacher (top-k > 0 for top-k losses) or choose another loss",
        )
    if options.advantage_clip is not None and not spec.clippable:
        raise ConfigError(f"advantage_clip applies to lightning_opd only, not {name!r}", "unset advantage_clip")
    _check_batch(logits, inputs, tp_group, options)
    view = token_view(logits, inputs, tp_group=tp_group, vocab_size=options.vocab_size, chunks=options.logit_chunks)
    lengths, num_present = _sequence_lengths(inputs.seq_ids, view.mask)
    weights = _token_weights(inputs, view.mask, lengths, options)
    token_loss = spec.token_loss(view, options)
    loss = (weights * torch.where(view.mask, token_loss, 0)).sum()
    metrics = token_metrics(view, inputs)
    metrics["sequences"] = num_present.float()
    return loss, metrics


def token_view(
    logits: Tensor, inputs: LossInputs, *, tp_group=None, vocab_size: int | None = None, chunks: int = LOGIT_CHUNKS
) -> TokenView:
    """One fused vocab-parallel pass, in `chunks` token chunks: lpS of the targets and of the teacher's top-k + tail."""
    mask = inputs.loss_mask.bool()
    shard = VocabShard.of(logits, tp_group, vocab_size)
    target = inputs.target_ids.masked_fill(~mask, 0)
    topk_ids = inputs.teacher_topk_ids
    if topk_ids is None:
        out = vocab_parallel_log_probs(logits, target.unsqueeze(-1), shard, chunks=chunks)
    else:
        topk_ids = topk_ids.masked_fill(~mask.unsqueeze(-1), 0)
        out = vocab_parallel_log_probs(logits, torch.cat([target.unsqueeze(-1), topk_ids], -1), shard, topk_ids, chunks=chunks)
    student_coarse = teacher_coarse = None
    teacher_top1 = None if inputs.teacher_top1_ids is None else inputs.teacher_top1_ids.masked_fill(~mask, 0)
    if topk_ids is not None:
        student_tail = out.rest.clamp_min(LOG_TAIL_MIN_PROB)
        student_coarse = torch.cat([out.ids[..., 1:], student_tail.unsqueeze(-1)], -1)
        lp_t = _clean(inputs.teacher_topk_logprobs, mask)
        teacher_tail = (-torch.expm1(torch.logsumexp(lp_t, -1))).clamp_min(TAIL_MIN_PROB).log()
        teacher_coarse = torch.cat([lp_t, teacher_tail.unsqueeze(-1)], -1)
        teacher_top1 = topk_ids.gather(-1, lp_t.argmax(-1, keepdim=True)).squeeze(-1)
    return TokenView(
        mask=mask,
        student=out.ids[..., 0],
        argmax=out.argmax,
        entropy=out.entropy,
        teacher=_clean(inputs.teacher_logprobs, mask),
        student_coarse=student_coarse,
        teacher_coarse=teacher_coarse,
        teacher_top1=teacher_top1,
        rollout=_clean(inputs.rollout_logprobs, mask),
    )


@torch.no_grad()
def token_metrics(v: TokenView, inputs: LossInputs) -> dict[str, Tensor]:
    def total(x: Tensor) -> Tensor:
        return torch.where(v.mask, x, 0).sum(dtype=torch.float32)

    lp_s = v.student.detach()
    out = {"tokens": total(torch.ones_like(lp_s)), "entropy_sum": total(v.entropy)}
    if v.teacher is not None:
        d = lp_s - v.teacher
        out["kl_to_teacher_sum"] = total(d)
        out["reverse_kl_sum"] = total(torch.expm1(-d) + d)  # (r - 1) - log r, r = exp(-d)
    if v.teacher_top1 is not None:
        out["top1_agree_sum"] = total((v.argmax == v.teacher_top1).float())
    if v.teacher_coarse is not None:
        lp_sc, lp_tc = v.student_coarse.detach(), v.teacher_coarse
        out["topk_reverse_kl_sum"] = total(coarse_kl(lp_sc, lp_tc))
        out["topk_forward_kl_sum"] = total(coarse_kl(lp_tc, lp_sc))
    teacher_values = [t for t in (inputs.teacher_logprobs, inputs.teacher_topk_logprobs) if t is not None]
    if teacher_values:
        bad = torch.zeros_like(v.mask)
        for t in teacher_values:
            bad |= ~torch.isfinite(t) if t.dim() == 2 else ~torch.isfinite(t).all(-1)
        out["teacher_nonfinite"] = total((bad & v.mask).float())
    if v.rollout is not None:
        d = lp_s - v.rollout
        w = d.exp()
        out["drift_chi2_sum"] = total(torch.expm1(d).square())
        out["drift_kl_sum"] = total(w * d - torch.expm1(d))  # w log w - (w - 1)
    return out


def _clean(values: Tensor | None, mask: Tensor) -> Tensor | None:
    """float32 copy with 0 where mask == 0, so garbage there cannot reach loss or gradient."""
    if values is None:
        return None
    keep = mask if values.dim() == mask.dim() else mask.unsqueeze(-1)
    return torch.where(keep, values.float(), 0)


def _sequence_lengths(seq_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per position: loss tokens of its sequence in this micro-batch; and how many sequences have any."""
    _, inverse, counts = torch.unique(seq_ids[mask], return_inverse=True, return_counts=True)
    lengths = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return lengths.masked_scatter_(mask, counts[inverse].float()), torch.tensor(float(counts.numel()), device=mask.device)


def _token_weights(inputs: LossInputs, mask: Tensor, lengths: Tensor, options: LossOptions) -> Tensor:
    if options.reduction == "token_mean":
        return mask.float() / inputs.num_loss_tokens
    if inputs.seq_num_tokens is not None:
        lengths = inputs.seq_num_tokens.float()
    return torch.where(mask, 1.0 / (lengths.clamp_min(1) * inputs.num_sequences), 0)


def _check_batch(logits: Tensor, inputs: LossInputs, tp_group, options: LossOptions) -> None:
    if logits.dim() != 3:
        raise ConfigError(f"logits have shape {tuple(logits.shape)}", "pass [batch, seq, vocab/tp] logits (GPTModel with labels=None)")
    bt = tuple(logits.shape[:2])
    for field in ("target_ids", "loss_mask", "seq_ids", "teacher_logprobs", "rollout_logprobs", "teacher_top1_ids", "seq_num_tokens"):
        value = getattr(inputs, field)
        if value is not None and tuple(value.shape) != bt:
            raise ConfigError(f"{field} has shape {tuple(value.shape)}, logits {tuple(logits.shape)}", f"give {field} as [batch, seq] = {bt}")
    ids, lps = inputs.teacher_topk_ids, inputs.teacher_topk_logprobs
    if (ids is None) != (lps is None) or (ids is not None and (ids.shape != lps.shape or tuple(ids.shape[:2]) != bt)):
        raise ConfigError(
            f"teacher top-k ids {None if ids is None else tuple(ids.shape)} and log-probs "
            f"{None if lps is None else tuple(lps.shape)} do not match each other or logits {tuple(logits.shape)}",
            "pass both as [batch, seq, k], or neither",
        )
    if inputs.num_sequences < 1:
        raise ConfigError(f"num_sequences is {inputs.num_sequences}", "pass the number of sequences in the global batch")
    if options.reduction == "token_mean" and not (inputs.num_loss_tokens or 0) >= 1:
        raise ConfigError("reduction token_mean without num_loss_tokens", "pass the global batch's loss-token count")
    if bool((inputs.loss_mask.bool() & (inputs.seq_ids < 0)).any()):
        raise ArtifactError("batch has loss tokens on padding (seq_id -1)", "fix the batch builder: loss_mask must be 0 on padding")
    if tp_group is None and (options.vocab_size is None or logits.shape[-1] < options.vocab_size):
        ps = sys.modules.get("megatron.core.parallel_state")
        tp = ps.get_tensor_model_parallel_world_size() if ps and ps.model_parallel_is_initialized() else 1
        if tp > 1:
            raise ConfigError(
                f"compute_loss got tp_group=None but tensor-parallel size is {tp}: the logits hold one vocabulary shard",
                "pass tp_group=parallel_state.get_tensor_model_parallel_group()",
            )
