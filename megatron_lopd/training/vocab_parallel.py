"""Log-softmax pieces on vocab-parallel logits, without gathering the vocabulary.

Megatron's output layer (a ColumnParallelLinear with `parallel_output=True`) leaves rank r
of the tensor-parallel group with the logit columns `[r * V_local, (r + 1) * V_local)` of
the padded vocabulary; megatron-core 0.16.1 `GPTModel.forward(labels=None)` returns them
as `[batch, seq, V_local]`. Megatron has no log-softmax / gather / argmax helper on such
shards (only `vocab_parallel_cross_entropy`, which also overwrites fp32 input logits in
place), so this module provides one fused, autograd-correct operation:

    out = vocab_parallel_log_probs(logits, ids, shard, exclude_ids=None)
    out.ids      log p(ids)                        [..., n]  differentiable
    out.rest     log p(vocabulary minus exclude)   [...]     differentiable (0 if None)
    out.argmax   global argmax id (lowest on ties)  [...]     long
    out.entropy  entropy of the full distribution  [...]     float32, no gradient
    out.lse      log-sum-exp of the logits         [...]     float32, no gradient

Forward: all-reduce MAX of the local maxima, exp of the shifted local logits, one
all-reduce SUM carrying the sum-exp, the sum-exp outside `exclude_ids`, the entropy term
and the gathered logits of `ids` (each id lives on exactly one rank; the others add 0),
and an all-reduce MIN that picks the argmax. Three collectives per call; nothing of size
V is communicated. Everything is computed in float32 whatever the logits' dtype.

Backward needs no communication: the outputs are replicated on every rank of the group,
so the loss built from them is too, and each rank only owes the gradient of its own
columns, dL/dz_v = g_ids scattered at ids - p_v (sum g_ids + g_rest) + g_rest q_v with
p the softmax and q the softmax restricted to the complement of `exclude_ids` (Megatron's
output layer then all-reduces the gradient of its input itself). The softmax is
recomputed from the saved logits rather than stored, so the saved state is the logits
(in their own dtype), the ids and three floats per position.

Memory. The vocabulary-sized work (shifted logits and their exp, with a bool mask, in
forward; the softmax, its scaling and a bool mask in backward; all float32, whatever the
logits' dtype) runs in `chunks` token chunks, each filling its rows of per-token buffers
(or of the gradient) before the next starts; the collectives still run once, on those
buffers. A chunk holds at most 2.25 float32 chunk-sized temporaries, so with the default
LOGIT_CHUNKS = 8 the temporaries beyond the logits and their gradient stay at ~0.3x the
float32 logits at any token count, bf16 logits included (one chunk: 2.25x; see
benchmarks/bench_loss_memory.py). Chunking only splits independent rows, so the results
do not depend on it.

`rest` is exact, not `log(1 - sum p(ids))`: the excluded columns are zeroed before the
sum, so a tail of 1e-9 keeps float32 relative precision instead of drowning in
cancellation. Columns at or beyond `shard.vocab_size` (Megatron's vocabulary padding) are
left out of every normalisation, argmax and entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lopd.errors import ConfigError


@dataclass(frozen=True)
class VocabShard:
    """Which columns of the vocabulary this rank's logits hold."""

    group: object | None  # tensor-parallel process group; None when there is no TP
    rank: int
    world_size: int
    start: int  # global id of the first local column
    size: int  # local columns
    vocab_size: int  # ids in [0, vocab_size) are real; the rest is padding

    @classmethod
    def of(cls, logits: torch.Tensor, group=None, vocab_size: int | None = None) -> VocabShard:
        """`group=None` (or a group of one) means the logits hold the whole vocabulary."""
        size = logits.shape[-1]
        rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        padded = size * world
        vocab_size = padded if vocab_size is None else int(vocab_size)
        if not 0 < vocab_size <= padded:
            raise ConfigError(
                f"vocab_size {vocab_size} does not fit logits with {size} columns x {world} tensor-parallel ranks",
                "pass the model's real vocabulary size (at most the padded output-layer size)",
            )
        return cls(group if world > 1 else None, rank, world, rank * size, size, vocab_size)

    @property
    def valid(self) -> int:
        """Local columns that are real vocabulary (a rank may hold only padding)."""
        return max(0, min(self.size, self.vocab_size - self.start))

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def local(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local column index, is-on-this-rank) for global ids; foreign ids map to column 0."""
        is_local = (ids >= self.start) & (ids < self.start + self.size)
        return torch.where(is_local, ids - self.start, 0), is_local

    def excluded_mask(self, exclude_ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Bool [..., size]: local columns listed in exclude_ids [..., k] (duplicates are fine)."""
        idx, is_local = self.local(exclude_ids)
        # Foreign ids write into an extra dummy column, so they never clear a real one.
        mask = torch.zeros(*shape[:-1], self.size + 1, dtype=torch.bool, device=exclude_ids.device)
        mask.scatter_(-1, torch.where(is_local, idx, self.size), True)
        return mask[..., : self.size]


@dataclass
class VocabLogProbs:
    ids: torch.Tensor  # [..., n] log p(ids), float32, differentiable
    rest: torch.Tensor  # [...] log p(not exclude_ids), float32, differentiable
    argmax: torch.Tensor  # [...] long
    entropy: torch.Tensor  # [...] float32
    lse: torch.Tensor  # [...] float32


# Token chunks of the vocabulary-sized work: bounds its temporaries to a fixed fraction of
# the logits whatever the token count (module docstring); more chunks only cost launches.
LOGIT_CHUNKS = 8


def _token_chunks(num_tokens: int, chunks: int) -> list[slice]:
    """At most `chunks` consecutive row slices of equal size (the last may be shorter)."""
    size = max(1, -(-num_tokens // chunks))
    return [slice(i, min(i + size, num_tokens)) for i in range(0, num_tokens, size)]


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, exclude_ids, shard: VocabShard, chunks: int):
        lead = logits.shape[:-1]
        # A view for Megatron's contiguous logits and column slices of them (a copy only for a
        # layout whose leading dims do not merge).
        rows = logits.reshape(-1, shard.size)
        row_ids = ids.reshape(rows.shape[0], ids.shape[-1])
        row_exclude = None if exclude_ids is None else exclude_ids.reshape(rows.shape[0], exclude_ids.shape[-1])
        valid = shard.valid
        if valid > 0:
            local_max, local_arg = rows[:, :valid].max(-1)
            local_max = local_max.float()
        else:  # this rank holds only vocabulary padding
            local_max = rows.new_full(rows.shape[:1], float("-inf"), dtype=torch.float32)
            local_arg = torch.zeros(rows.shape[:1], dtype=torch.long, device=rows.device)
        m = shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)

        # Per row: sum-exp, sum-exp outside exclude_ids, entropy term, then the picked logits.
        stats = rows.new_empty((rows.shape[0], 3 + row_ids.shape[-1]), dtype=torch.float32)
        for span in _token_chunks(rows.shape[0], chunks):
            shifted = rows[span] - m[span, None]  # float32 (type promotion), no float32 copy of bf16 logits
            e = shifted.exp()
            if valid < shard.size:
                e[:, valid:] = 0
            stats[span, 0] = e.sum(-1)
            # entropy = log S - sum(e * shifted) / S, with S = sum(e): both terms O(log V).
            # Zero-probability columns (padding, -inf logits) must add 0, not 0 * -inf.
            stats[span, 2] = shifted.masked_fill_(e == 0, 0).mul_(e).sum(-1)
            del shifted
            if row_exclude is None:
                stats[span, 1] = stats[span, 0]
            else:
                e.masked_fill_(shard.excluded_mask(row_exclude[span], e.shape), 0)
                stats[span, 1] = e.sum(-1)
            del e
        idx, is_local = shard.local(row_ids)
        stats[:, 3:] = torch.where(is_local, rows.gather(-1, idx).float(), 0)
        stats = shard.all_reduce(stats).view(*lead, stats.shape[-1])
        sum_exp, sum_exp_rest, e_shifted, picked = stats[..., 0], stats[..., 1], stats[..., 2], stats[..., 3:]
        m, local_max, local_arg = m.view(lead), local_max.view(lead), local_arg.view(lead)

        # Log-probs as (z - m) - log S, never z - (m + log S): with logits ~20 the rounding of
        # m + log S alone would cost ~1e-6 absolute on every log-prob.
        log_s, log_s_rest = sum_exp.log(), sum_exp_rest.log()  # -inf: excluded ids hold all the mass
        entropy = log_s - e_shifted / sum_exp
        # Global argmax: the lowest id among the ranks whose local maximum is the global one.
        candidate = torch.where(local_max == m, local_arg + shard.start, torch.iinfo(torch.long).max)
        argmax = shard.all_reduce(candidate, dist.ReduceOp.MIN)

        lse = m + log_s
        ctx.shard, ctx.chunks = shard, chunks
        ctx.save_for_backward(logits, ids, exclude_ids, m, log_s, log_s_rest)
        ctx.mark_non_differentiable(argmax, entropy, lse)
        return (picked - m.unsqueeze(-1)) - log_s.unsqueeze(-1), log_s_rest - log_s, argmax, entropy, lse

    @staticmethod
    def backward(ctx, g_ids, g_rest, _g_argmax, _g_entropy, _g_lse):
        logits, ids, exclude_ids, m, log_s, log_s_rest = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        rows = logits.reshape(-1, shard.size)
        n = rows.shape[0]
        m, log_s, log_s_rest, g_rest = m.reshape(n, 1), log_s.reshape(n, 1), log_s_rest.reshape(n), g_rest.reshape(n)
        g_ids = g_ids.reshape(n, ids.shape[-1])
        idx, is_local = shard.local(ids.reshape(n, ids.shape[-1]))
        g_local = torch.where(is_local, g_ids, 0)
        coef = -(g_ids.sum(-1) + g_rest)  # every column: -p_v * (sum g_ids + g_rest)
        if exclude_ids is None:
            kept = coef + g_rest  # q == p
        else:
            # q_v = p_v * S / S_rest off the excluded columns; an empty rest has no q.
            ratio = torch.where(torch.isfinite(log_s_rest), (log_s[:, 0] - log_s_rest).exp(), 0)
            kept = coef + g_rest * ratio
            row_exclude = exclude_ids.reshape(n, exclude_ids.shape[-1])
        coef, kept = coef.unsqueeze(-1), kept.unsqueeze(-1)
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        in_place = grad.dtype == torch.float32  # else a float32 chunk, rounded into grad once
        for span in _token_chunks(n, ctx.chunks):
            p = torch.sub(rows[span], m[span], out=grad[span] if in_place else None).sub_(log_s[span]).exp_()
            if shard.valid < shard.size:
                p[:, shard.valid :] = 0
            if exclude_ids is None:
                p.mul_(kept[span])
            else:
                p.mul_(torch.where(shard.excluded_mask(row_exclude[span], p.shape), coef[span], kept[span]))
            p.scatter_add_(-1, idx[span], g_local[span])
            if not in_place:
                grad[span] = p
            del p
        return grad.view(logits.shape), None, None, None, None


def check_ids(ids: torch.Tensor, shard: VocabShard, what: str = "token ids") -> None:
    """Ids outside the vocabulary would silently gather 0 (no rank holds them): refuse them."""
    if ids.numel() == 0:
        return
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= shard.vocab_size:
        raise ConfigError(
            f"{what} span [{lo}, {hi}], outside the vocabulary [0, {shard.vocab_size})",
            "check that the data was tokenized with the model's tokenizer and that vocab_size is right",
        )


def check_chunks(chunks: int) -> None:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"logit chunks {chunks!r} must be a positive integer", f"use e.g. {LOGIT_CHUNKS} (1 = no chunking)")


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    shard: VocabShard,
    exclude_ids: torch.Tensor | None = None,
    *,
    chunks: int = LOGIT_CHUNKS,
) -> VocabLogProbs:
    """Full-vocabulary log-probs of `ids` [..., n] (and of the complement of `exclude_ids`
    [..., k]) from this rank's logit columns [..., V_local]; see the module docstring.

    Every id must be a real vocabulary id (checked): mask garbage positions before calling.
    `chunks`: token chunks of the vocabulary-sized work (memory only; 1 = all at once).
    """
    check_ids(ids, shard)
    if exclude_ids is not None:
        check_ids(exclude_ids, shard, "excluded ids")
    check_chunks(chunks)
    out = _VocabParallelLogProbs.apply(logits, ids, exclude_ids, shard, chunks)
    return VocabLogProbs(*out)


def vocab_parallel_argmax(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Global argmax id [...] of vocab-parallel logits (lowest id on ties), no gradient."""
    with torch.no_grad():
        empty = torch.zeros(*logits.shape[:-1], 0, dtype=torch.long, device=logits.device)
        return vocab_parallel_log_probs(logits.detach(), empty, shard).argmax
