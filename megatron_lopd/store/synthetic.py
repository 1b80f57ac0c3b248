"""Synthetic teacher scores with realistic statistics, for tests, benchmarks and notebooks.

No real teacher is needed to exercise the store: `synthetic_record(i, spec)` builds
sequence ``i`` deterministically from ``(spec.seed, i)`` (so any writer can build any
shard independently), with these statistics (documented because the benchmark's
bytes/token depend on them):

- Token frequencies are Zipf-like, p(rank r) ~ r**-zipf_a over the vocabulary, and a
  token's id is its frequency rank (BPE vocabularies are roughly ordered by frequency;
  ``permute_ids=True`` maps ranks to ids by a fixed random permutation instead, the
  pessimistic case for compression).
- Burstiness: each sequence has a working vocabulary of ``working_vocab`` tokens drawn
  from the prior; a top-k candidate comes from it with probability ``working_frac``
  (Zipf-weighted within it), otherwise from the global prior. Real reasoning traces
  reuse a few hundred tokens (numbers, variable names, formatting).
- Peaked distributions: top-1 probability ``1 - exp(N(-2.5, 1.5))`` (median 0.92),
  ranks j >= 2 share the rest with p ~ j**-b, b ~ U(1, 3), plus N(0, 0.3) log-noise, then
  sorted. The sampled token is drawn from that distribution (the tail beyond the top-k
  included, where it gets a log-prob below the k-th); ``rollout_logprobs`` is the
  teacher's value plus N(0, 0.3) noise, clipped at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from megatron_lopd.store.schema import SequenceRecord

_MIN_CANDIDATES = 16  # the sampled token's distribution always has at least this many ranks


@dataclass(frozen=True)
class SyntheticSpec:
    vocab_size: int = 151936
    top_k: int = 16
    prompt_len: tuple[int, int] = (32, 256)
    response_len: tuple[int, int] = (16, 4096)
    response_len_median: int = 1500  # lognormal(sigma 0.7) clipped to response_len
    zipf_a: float = 1.1
    working_vocab: int = 1024
    working_frac: float = 0.6
    permute_ids: bool = False
    with_rollout_logprobs: bool = True
    seed: int = 0


@lru_cache(maxsize=8)
def _prior(vocab_size: int, zipf_a: float, permute: bool) -> tuple[np.ndarray, np.ndarray]:
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -zipf_a
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    ids = np.random.default_rng(12345).permutation(vocab_size) if permute else np.arange(vocab_size)
    return cdf, ids.astype(np.int32)


@lru_cache(maxsize=8)
def _zeta_table() -> tuple[np.ndarray, np.ndarray]:
    b = np.linspace(0.9, 3.1, 221)
    j = np.arange(2, 100_000, dtype=np.float64)
    return b, np.array([(j ** -x).sum() for x in b])


def _draw(rng: np.random.Generator, cdf: np.ndarray, shape) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(shape)), len(cdf) - 1)


def _distinct_rows(rng: np.random.Generator, draws: np.ndarray, k: int, cdf: np.ndarray) -> np.ndarray:
    """First k distinct values of each row of ``draws`` (falls back to exact sampling)."""
    order = np.argsort(draws, axis=1, kind="stable")
    sorted_ = np.take_along_axis(draws, order, axis=1)
    dup_sorted = np.zeros_like(draws, dtype=bool)
    dup_sorted[:, 1:] = sorted_[:, 1:] == sorted_[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    keep = ~dup & (np.cumsum(~dup, axis=1) <= k)
    out = np.empty((len(draws), k), dtype=draws.dtype)
    short = keep.sum(axis=1) < k
    rows = np.flatnonzero(~short)
    out[rows] = draws[rows][keep[rows]].reshape(-1, k)
    p = np.diff(np.concatenate([[0.0], cdf]))
    for r in np.flatnonzero(short):
        out[r] = rng.choice(len(cdf), size=k, replace=False, p=p)
    return out


def synthetic_record(index: int, spec: SyntheticSpec = SyntheticSpec()) -> SequenceRecord:
    rng = np.random.default_rng([spec.seed, index])
    cdf, rank_to_id = _prior(spec.vocab_size, spec.zipf_a, spec.permute_ids)
    k = spec.top_k
    kk = min(max(k, _MIN_CANDIDATES), spec.vocab_size)
    lo, hi = spec.response_len
    n = int(np.clip(round(spec.response_len_median * np.exp(0.7 * rng.standard_normal())), lo, hi))
    prompt = rank_to_id[_draw(rng, cdf, int(rng.integers(spec.prompt_len[0], spec.prompt_len[1] + 1)))]

    # Candidates: working vocabulary (bursty) or the global prior; kk distinct per position.
    work = _draw(rng, cdf, spec.working_vocab)
    wcdf = np.cumsum(np.arange(1, spec.working_vocab + 1) ** -1.0)
    wcdf /= wcdf[-1]
    over = 4 * kk if spec.vocab_size > 8 * kk else 2 * kk
    draws = np.where(rng.random((n, over)) < spec.working_frac, work[_draw(rng, wcdf, (n, over))],
                     _draw(rng, cdf, (n, over)))
    ranks = _distinct_rows(rng, draws, kk, cdf)

    # Peaked log-probs, sorted descending.
    p1 = 1.0 - np.exp(np.minimum(rng.normal(-2.5, 1.5, n), -1e-3))
    b = rng.uniform(1.0, 3.0, n)
    bt, zt = _zeta_table()
    j = np.arange(2, kk + 1)
    rest = (np.log1p(-p1)[:, None] - b[:, None] * np.log(j)[None, :] - np.log(np.interp(b, bt, zt))[:, None]
            + rng.normal(0.0, 0.3, (n, kk - 1)))
    lp = -np.sort(-np.concatenate([np.log(p1)[:, None], rest], axis=1), axis=1)
    mass = np.log(np.exp(lp).sum(axis=1))  # the noise may push the candidates' mass over 1
    lp -= np.maximum(0.0, mass - np.log(0.999))[:, None]

    # Sampled token: a rank with its probability, or the tail beyond the kk candidates.
    pick = (rng.random(n)[:, None] > np.cumsum(np.exp(lp), axis=1)).sum(axis=1)
    in_top = pick < kk
    rows = np.arange(n)
    sampled_rank = np.where(in_top, ranks[rows, np.minimum(pick, kk - 1)], 0)
    teacher = np.where(in_top, lp[rows, np.minimum(pick, kk - 1)], lp[:, -1] - 0.01 - rng.exponential(1.0, n))
    for t in np.flatnonzero(~in_top):  # a token outside the candidates (rare: the tail mass)
        choice = int(_draw(rng, cdf, 1)[0])
        while choice in ranks[t]:
            choice = int(rng.integers(0, spec.vocab_size))
        sampled_rank[t] = choice
    response = rank_to_id[sampled_rank]
    rollout = np.minimum(teacher + rng.normal(0.0, 0.3, n), 0.0) if spec.with_rollout_logprobs else None
    return SequenceRecord(
        prompt_ids=prompt.astype(np.int32),
        response_ids=response.astype(np.int32),
        teacher_logprobs=teacher.astype(np.float32),
        topk_ids=rank_to_id[ranks[:, :k]] if k else None,
        topk_logprobs=lp[:, :k].astype(np.float16) if k else None,
        rollout_logprobs=None if rollout is None else rollout.astype(np.float32),
        prompt_id=f"synthetic-{index // 4}",
        sample_index=index % 4,
    )


def synthetic_records(indices, spec: SyntheticSpec = SyntheticSpec()) -> list[SequenceRecord]:
    return [synthetic_record(int(i), spec) for i in indices]
