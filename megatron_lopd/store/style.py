"""Cross-teacher style: how consistent a teacher's scores are with the SFT model R, and an offline correction.

The paper's rule is a consistent teacher: the model that scores the rollouts wrote the SFT
data. When it did not (the SFT data came from another model), the gap of each sampled token

    d_t = lpT_t - lpR_t      (lpR: R's log-prob of the token, the store's `rollout_logprobs`)

mixes context-specific teacher evidence with a recurring "style" part: the teacher dislikes
(or likes) R's wording, formatting and cadence wherever they occur. Lightning OPD 2.0 (Wu,
Han, Cai, arXiv 2607.28449) estimates that part and trains on the residual. Its full text
could not be read here; this module follows its public summaries, so details may differ:

- two lookup tables of d: by token id, and by (response-position bin, R-surprisal bin):
  position bin ``t * P // R`` of a response of R tokens; surprisal ``-lpR`` cut at the
  store's own quantiles (the bins depend on lpR only, never on d);
- each rollout weighs equally in a cell: a cell's value is the mean, over the rollouts with
  tokens in it, of each rollout's own mean d there; a cell supported by fewer than
  ``min_count`` rollouts backs off to the global mean (the mean over rollouts of their mean d);
- rollout-level K-fold cross-fitting: rollouts (never tokens) are dealt into K folds by a
  seeded permutation; a token of a rollout in fold k is estimated from tables built on the
  other folds only, so no rollout's correction uses its own tokens;
- ``style_t = (token table + position/surprisal table) / 2``; the corrected teacher score is
  ``lpT_t - style_t``, so the ordinary Lightning OPD advantage becomes
  ``r_t + lpR_t - lpS_t`` with the residual ``r_t = d_t - style_t``. No extra model passes.
  The corrected score may be above 0 (a score, not a log-prob; see schema.TEACHER_SIGNALS).

The stored top-k (our decision; the summaries say nothing about it): a per-position offset
cancels in a distribution, so the top-k gets the token table only,
``p'(v) ~ p(v) exp(-tok(v) / 2)`` over the top-k and ``tail * exp(-g / 2)`` for the tail
bucket (g: the global mean), renormalised and re-sorted. Leaving it as it was would let a
top-k loss train on the uncorrected teacher from a store that says it is corrected.

`consistency_report` measures (nothing written); `residualize_store` writes the corrected
store (same schema, ``teacher_signal="style_residualized"``; its provenance names the
parent store's fingerprint, the method and every parameter; the parent is never modified).
Everything is float64 and deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lopd.errors import ArtifactError, ConfigError

METHOD = ("cross-fitted style tables (token id; response position x R-surprisal), rollout-weighted, "
          "averaged; after Lightning OPD 2.0 (arXiv 2607.28449) as publicly described")
PROVENANCE_KEY = "style_residualized"  # provenance.extra[...] of a residualized store
BIG_GAP_NATS = 1.0  # the summaries' yardstick: share of tokens whose |gap| exceeds 1 nat
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass(frozen=True)
class StyleConfig:
    """The estimator's knobs (`lopd store consistency|residualize` flags of the same names)."""

    folds: int = 5
    position_bins: int = 8
    surprisal_bins: int = 8
    min_count: int = 5  # rollouts a cell needs before its own mean replaces the global mean
    seed: int = 0  # the permutation that deals rollouts into folds

    def validate(self) -> None:
        for name, low in (("folds", 2), ("position_bins", 1), ("surprisal_bins", 1), ("min_count", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"style correction: {name}={value!r} must be an integer >= {low}",
                                  f"pass --{name.replace('_', '-')} {low} or more")


@dataclass
class StoreGaps:
    """Every response token of a store, in store order, as the estimator needs it."""

    token: np.ndarray  # int64 [N] the sampled token id
    teacher: np.ndarray  # float64 [N] lpT
    reference: np.ndarray  # float64 [N] lpR
    lengths: np.ndarray  # int64 [num_rollouts] response length of each rollout (sequence)

    @property
    def num_rollouts(self) -> int:
        return len(self.lengths)

    @property
    def gap(self) -> np.ndarray:
        return self.teacher - self.reference

    @property
    def rollout(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_rollouts, dtype=np.int64), self.lengths)

    @property
    def position(self) -> np.ndarray:
        starts = np.cumsum(self.lengths) - self.lengths
        return np.arange(int(self.lengths.sum()), dtype=np.int64) - np.repeat(starts, self.lengths)

    @classmethod
    def of(cls, responses: list[np.ndarray], teacher: list[np.ndarray], reference: list[np.ndarray]) -> "StoreGaps":
        cat = lambda parts, dtype: np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.empty(0, dtype)  # noqa: E731
        return cls(cat(responses, np.int64), cat(teacher, np.float64), cat(reference, np.float64),
                   np.array([len(r) for r in responses], dtype=np.int64))


@dataclass
class StyleFit:
    """The cross-fitted style estimate of every token, and the per-fold tables behind it."""

    config: StyleConfig
    fold: np.ndarray  # int64 [num_rollouts]: fold of each rollout (-1: an empty response)
    surprisal_edges: np.ndarray  # float64 [S - 1]: bin j holds edges[j-1] <= -lpR < edges[j]
    token_tables: np.ndarray  # float64 [K, vocab]: fold k's token table (built without fold k; backed off)
    cell_tables: np.ndarray  # float64 [K, P * S]: fold k's position x surprisal table
    global_means: np.ndarray  # float64 [K]: fold k's global mean (without fold k)
    token_part: np.ndarray  # float64 [N]: each token's token-table value (its rollout's fold)
    cell_part: np.ndarray  # float64 [N]: each token's position x surprisal value

    @property
    def style(self) -> np.ndarray:
        return 0.5 * (self.token_part + self.cell_part)


def _rollout_weighted_sums(keys: np.ndarray, num_keys: int, gaps: StoreGaps, rollout: np.ndarray, fold: np.ndarray,
                           folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Per fold and key: the sum over rollouts of each rollout's mean gap in that key, and how many rollouts."""
    pair, inverse = np.unique(rollout * num_keys + keys, return_inverse=True)
    pair_mean = np.bincount(inverse, weights=gaps.gap) / np.bincount(inverse)
    flat = fold[pair // num_keys] * num_keys + pair % num_keys
    sums = np.bincount(flat, weights=pair_mean, minlength=folds * num_keys).reshape(folds, num_keys)
    counts = np.bincount(flat, minlength=folds * num_keys).reshape(folds, num_keys)
    return sums, counts


def _cross_fitted_tables(sums: np.ndarray, counts: np.ndarray, global_means: np.ndarray, min_count: int) -> np.ndarray:
    """Fold k's table from the other folds only; cells with fewer than min_count rollouts take fold k's global mean."""
    tables = np.empty(sums.shape, dtype=np.float64)
    for k in range(len(sums)):
        others = np.arange(len(sums)) != k
        s, c = sums[others].sum(0), counts[others].sum(0)
        tables[k] = np.where(c >= min_count, s / np.maximum(c, 1), global_means[k])
    return tables


def _position_bins(gaps: StoreGaps, bins: int, where: str) -> np.ndarray:
    lengths = np.repeat(gaps.lengths, gaps.lengths)
    out = gaps.position * bins // np.maximum(lengths, 1)
    empty = np.flatnonzero(np.bincount(out, minlength=bins) == 0)
    if len(empty):
        raise ArtifactError(f"{where}: response-position bin {int(empty[0])} of {bins} holds no tokens "
                            f"(the longest response has {int(gaps.lengths.max(initial=0))} tokens)",
                            f"use fewer --position-bins (at most {max(1, int(gaps.lengths.max(initial=1)))})")
    return out


def _surprisal_bins(gaps: StoreGaps, bins: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    surprisal = -gaps.reference
    edges = np.quantile(surprisal, np.arange(1, bins) / bins) if bins > 1 else np.empty(0)
    out = np.searchsorted(edges, surprisal, side="right")
    empty = np.flatnonzero(np.bincount(out, minlength=bins) == 0)
    if len(empty):  # tied quantiles: many tokens share one lpR (e.g. exactly 0 where R is certain)
        distinct = len(np.unique(surprisal))
        raise ArtifactError(f"{where}: R-surprisal bin {int(empty[0])} of {bins} holds no tokens "
                            f"(R's log-probs take {distinct} distinct values and tie at the bin edges)",
                            "use fewer --surprisal-bins")
    return out, edges


def fit_style(gaps: StoreGaps, vocab_size: int, config: StyleConfig, where: str = "teacher store") -> StyleFit:
    """Cross-fit the two tables and estimate every token's style offset (module docstring)."""
    config.validate()
    nonempty = np.flatnonzero(gaps.lengths > 0)
    needed = config.folds * config.min_count
    if len(nonempty) < needed:
        raise ArtifactError(f"{where}: {len(nonempty)} non-empty rollouts are too few for {config.folds} folds "
                            f"with min_count {config.min_count} (at least {needed})",
                            "use fewer --folds or a lower --min-count, or score more rollouts")
    positions = _position_bins(gaps, config.position_bins, where)
    surprisal, edges = _surprisal_bins(gaps, config.surprisal_bins, where)
    fold = np.full(gaps.num_rollouts, -1, dtype=np.int64)
    fold[np.random.default_rng(config.seed).permutation(nonempty)] = np.arange(len(nonempty)) % config.folds
    rollout, gap = gaps.rollout, gaps.gap
    rollout_mean = np.bincount(rollout, weights=gap, minlength=gaps.num_rollouts)[nonempty] / gaps.lengths[nonempty]
    global_means = np.array([rollout_mean[fold[nonempty] != k].mean() for k in range(config.folds)])
    cells = positions * config.surprisal_bins + surprisal
    num_cells = config.position_bins * config.surprisal_bins
    token_tables = _cross_fitted_tables(*_rollout_weighted_sums(gaps.token, vocab_size, gaps, rollout, fold, config.folds),
                                        global_means, config.min_count)
    cell_tables = _cross_fitted_tables(*_rollout_weighted_sums(cells, num_cells, gaps, rollout, fold, config.folds),
                                       global_means, config.min_count)
    token_fold = fold[rollout]
    return StyleFit(config, fold, edges, token_tables, cell_tables, global_means,
                    token_tables[token_fold, gaps.token], cell_tables[token_fold, cells])


# ---------------------------------------------------------------------------------------
# The consistency meter


def _explained(gap: np.ndarray, estimate: np.ndarray) -> float:
    """Share of the gap's variance (about its mean) that the estimate removes: 1 - SS(gap - est) / SS(gap)."""
    total = float(((gap - gap.mean()) ** 2).sum())
    return 1.0 - float(((gap - estimate) ** 2).sum()) / total if total > 0 else 0.0


def _distribution(values: np.ndarray) -> dict[str, Any]:
    return {"mean": float(values.mean()), "sd": float(values.std()),
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))},
            "share_over_1nat": float((np.abs(values) > BIG_GAP_NATS).mean())}


@dataclass
class ConsistencyReport:
    """How consistent a store's teacher is with the SFT model R that sampled its rollouts."""

    store: str
    teacher: str
    rollout_policy: str
    rollouts: int
    tokens: int
    config: dict[str, Any]
    gap: dict[str, Any]  # distribution of d = lpT - lpR: mean, sd, quantiles, share |d| > 1 nat
    residual: dict[str, Any]  # the same for d - style (cross-fitted)
    explained: dict[str, float]  # share of d's variance removed by: the token table, the cell table, their average
    recurring: list[dict[str, Any]] = field(default_factory=list)  # tokens with the largest recurring gap

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        g, r, e = self.gap, self.residual, self.explained
        q = g["quantiles"]
        out = [
            f"teacher-R consistency  {self.store}",
            f"teacher {self.teacher}; rollouts by {self.rollout_policy or 'unknown'}: {self.rollouts} rollouts, {self.tokens} tokens",
            f"gap d = lpT - lpR     mean {g['mean']:+.3f}  sd {g['sd']:.3f}  median {q['0.5']:+.3f}  "
            f"5%..95% [{q['0.05']:+.3f}, {q['0.95']:+.3f}]  |d| > 1 nat: {100 * g['share_over_1nat']:.1f} %",
            f"style explains        {100 * e['style']:.1f} % of d's variance (token table {100 * e['token']:.1f} %, "
            f"position x surprisal {100 * e['cell']:.1f} %; cross-fitted, {self.config['folds']} folds)",
            f"residual d - style    mean {r['mean']:+.3f}  sd {r['sd']:.3f}  |r| > 1 nat: {100 * r['share_over_1nat']:.1f} %",
        ]
        if self.recurring:
            out.append("largest recurring gaps (token: mean d over the rollouts using it, rollouts):")
            out += [f"  {t['token']:>7} {t.get('text', '')!r:<14} {t['mean_gap']:+.3f}  {t['rollouts']}" for t in self.recurring]
        out.append(_verdict(self))
        return out


def _verdict(report: ConsistencyReport) -> str:
    """One sentence a user can act on; the thresholds are this meter's, not the paper's."""
    share = report.gap["share_over_1nat"]
    if share < 0.05 and abs(report.gap["mean"]) < 0.25:
        return "reading: the teacher agrees with R about as a consistent teacher does; train on the store as it is"
    return ("reading: the teacher disagrees with R systematically; re-score with the model that wrote the SFT data, "
            "or `lopd store residualize` and compare both runs")


def _recurring(gaps: StoreGaps, config: StyleConfig, vocab_size: int, top: int, tokenizer) -> list[dict[str, Any]]:
    """The token table on all rollouts (descriptive, not cross-fitted): the tokens in >= min_count rollouts whose
    gap recurs most, |mean gap| x rollouts (a rare token with a large gap moves few updates)."""
    if top <= 0:
        return []
    one_fold = np.zeros(gaps.num_rollouts, dtype=np.int64)
    sums, counts = _rollout_weighted_sums(gaps.token, vocab_size, gaps, gaps.rollout, one_fold, 1)
    supported = np.flatnonzero(counts[0] >= config.min_count)
    means = sums[0, supported] / counts[0, supported]
    order = np.lexsort((supported, -np.abs(means) * counts[0, supported]))[:top]
    out = []
    for i in order:
        entry = {"token": int(supported[i]), "mean_gap": float(means[i]), "rollouts": int(counts[0, supported[i]])}
        if tokenizer is not None:
            entry["text"] = tokenizer.decode([int(supported[i])])
        out.append(entry)
    return out


def _open_with_lpr(path: str | os.PathLike):
    """The store opened without top-k; refused if it cannot give lpR."""
    from megatron_lopd.store.reader import TeacherStore

    store = TeacherStore.open(path, load_topk=False)
    if not store.has_rollout_logprobs:
        raise ArtifactError(f"teacher store {path} holds no rollout log-probs (R's lpR), which the teacher-R gap needs",
                            "regenerate the rollouts with `lopd generate --record-logprobs` and score them again")
    return store


def _read_gaps(store, progress: bool) -> StoreGaps:
    responses, teacher, reference = [], [], []
    for shard_records in _shard_batches(store, progress, "read gaps"):
        for rec in shard_records:
            responses.append(rec.response_ids)
            teacher.append(rec.teacher_logprobs)
            reference.append(rec.rollout_logprobs)
    return StoreGaps.of(responses, teacher, reference)


def _shard_batches(store, progress: bool, desc: str):
    """The store's records, one shard at a time, with a tokens/s bar."""
    from tqdm import tqdm

    sps = store.meta.sequences_per_shard
    with tqdm(total=store.num_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(store), sps):
            records = store.get_batch(range(start, min(start + sps, len(store))))
            yield records
            bar.update(sum(len(r.response_ids) for r in records))


def _report(path, store, gaps: StoreGaps, fit: StyleFit, tokenizer, top: int) -> ConsistencyReport:
    gap, prov = gaps.gap, store.provenance
    return ConsistencyReport(
        store=str(path), teacher=prov.teacher_fingerprint, rollout_policy=prov.rollout_generator_fingerprint,
        rollouts=gaps.num_rollouts, tokens=len(gap), config=dataclasses.asdict(fit.config),
        gap=_distribution(gap), residual=_distribution(gap - fit.style),
        explained={"token": _explained(gap, fit.token_part), "cell": _explained(gap, fit.cell_part), "style": _explained(gap, fit.style)},
        recurring=_recurring(gaps, fit.config, store.vocab_size, top, tokenizer),
    )


def consistency_report(path: str | os.PathLike, config: StyleConfig = StyleConfig(), *, tokenizer=None, top: int = 10,
                       progress: bool = False) -> ConsistencyReport:
    """Measure the teacher-R gap of a store and how much of it the cross-fitted style tables explain."""
    config.validate()
    store = _open_with_lpr(path)
    gaps = _read_gaps(store, progress)
    try:
        return _report(path, store, gaps, fit_style(gaps, store.vocab_size, config, f"teacher store {path}"), tokenizer, top)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# The correction as a derived store


def corrected_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray, token_values: np.ndarray, tail_value: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k with the token table applied and renormalised with the tail (module docstring).

    ``token_values`` [R, k]: the token table's value of each candidate; ``tail_value`` [R]: the
    global mean, for the tail bucket. Returns (ids, log-probs) re-sorted descending per
    position, and the per-position KL of the original coarse distribution (top-k + tail) from
    the corrected one, in nats.
    """
    lp = topk_logprobs.astype(np.float64)
    tail = np.clip(-np.expm1(np.logaddexp.reduce(lp, axis=1)), 0.0, 1.0)  # fp16 top-k may sum a hair above 1
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty tail: log 0 = -inf, carrying no mass
        log_tail = np.log(tail)
        shifted, shifted_tail = lp - 0.5 * token_values, log_tail - 0.5 * tail_value
        log_z = np.logaddexp(np.logaddexp.reduce(shifted, axis=1), shifted_tail)
        new = shifted - log_z[:, None]
        kl = (np.exp(lp) * (lp - new)).sum(1) + np.where(tail > 0, tail * (log_tail - (shifted_tail - log_z)), 0.0)
    order = np.argsort(-new, axis=1, kind="stable")
    return np.take_along_axis(topk_ids, order, 1), np.take_along_axis(new, order, 1), kl


@dataclass
class ResidualizeResult:
    out: str
    parent: str
    parent_fingerprint: str
    report: ConsistencyReport
    positive_scores: float  # share of corrected sampled-token scores above 0
    topk_kl: float | None  # mean KL (nats) of the corrected top-k + tail distribution from the original
    topk_top1_changed: float | None  # share of positions whose top-1 token changed
    seconds: float


def residualize_store(path: str | os.PathLike, out: str | os.PathLike, config: StyleConfig = StyleConfig(), *,
                      overwrite: bool = False, progress: bool = False, tokenizer=None) -> ResidualizeResult:
    """Write the style-corrected copy of a finalized store to ``out`` (module docstring). Every
    refusal (no lpR, already residualized, too few rollouts, empty bins, out = the parent)
    happens before anything is written."""
    from megatron_lopd.store.finalize import finalize_store
    from megatron_lopd.store.layout import store_fingerprint
    from megatron_lopd.store.schema import STYLE_RESIDUALIZED, SequenceRecord, StoreProvenance
    from megatron_lopd.store.writer import StoreWriter

    t0 = time.perf_counter()
    config.validate()
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--out {out} is the store being corrected", "write the corrected store to a new path; the original is kept")
    store = _open_with_lpr(path)
    meta = store.meta
    if meta.residualized:
        parent = meta.provenance.extra.get(PROVENANCE_KEY, {}).get("parent_store", "?")
        raise ArtifactError(f"teacher store {path} is already style-residualized (from {parent})",
                            "residualize the original store, with other parameters if needed; a second pass would subtract the style twice")
    gaps = _read_gaps(store, progress)
    fit = fit_style(gaps, meta.vocab_size, config, f"teacher store {path}")
    report = _report(path, store, gaps, fit, tokenizer, 10)
    store.close()
    parent_fp = store_fingerprint(path, meta)
    record = {
        "parent_store": str(path.resolve()), "parent_fingerprint": parent_fp, "parent_engine": meta.provenance.engine,
        "method": METHOD, "params": dataclasses.asdict(config),
        "gap_share_over_1nat": report.gap["share_over_1nat"], "residual_share_over_1nat": report.residual["share_over_1nat"],
        "variance_explained": report.explained["style"],
    }
    kept = {k: v for k, v in meta.provenance.to_dict().items() if k not in ("code_version", "created_at", "engine", "engine_version", "extra")}
    prov = StoreProvenance(**kept, engine="lopd store residualize", extra={**meta.provenance.extra, PROVENANCE_KEY: record})
    writer = StoreWriter.create(out, num_sequences=meta.num_sequences, top_k=meta.top_k, vocab_size=meta.vocab_size,
                                provenance=prov, sequences_per_shard=meta.sequences_per_shard, has_rollout_logprobs=True,
                                chunk_tokens=meta.chunk_tokens, clevel=meta.clevel, teacher_signal=STYLE_RESIDUALIZED,
                                overwrite=overwrite, overwrite_flag="--overwrite")
    if writer.meta.complete:
        raise ArtifactError(f"teacher store {out} already exists and is complete", "pass --overwrite to write it again, or choose a new --out")
    starts, style = np.cumsum(gaps.lengths) - gaps.lengths, fit.style
    full = type(store).open(path)
    fold_of_token = fit.fold[gaps.rollout]
    kl_sum, changed = 0.0, 0
    for records in _shard_batches(full, progress, "residualize"):
        first, last = records[0].index, records[-1].index
        tokens = slice(starts[first], starts[last] + gaps.lengths[last])  # the shard's tokens, one numpy pass
        ids = lp = None
        if meta.top_k:
            old_ids = np.concatenate([np.asarray(r.topk_ids) for r in records])
            fold = fold_of_token[tokens]
            ids, lp, kl = corrected_topk(old_ids, np.concatenate([np.asarray(r.topk_logprobs) for r in records]),
                                         fit.token_tables[fold[:, None], old_ids], fit.global_means[fold])
            kl_sum, changed = kl_sum + float(kl.sum()), changed + int((ids[:, 0] != old_ids[:, 0]).sum())
        scores = (gaps.teacher[tokens] - style[tokens]).astype(np.float32)
        cuts = np.cumsum([len(r.response_ids) for r in records])[:-1]
        per = lambda a: np.split(a, cuts) if a is not None else [None] * len(records)  # noqa: E731
        corrected = [SequenceRecord(r.prompt_ids, r.response_ids, t, i, p, r.rollout_logprobs, r.prompt_id, r.sample_index)
                     for r, t, i, p in zip(records, per(scores), per(ids), per(lp))]
        shard = first // meta.sequences_per_shard
        if not writer.is_done(shard):
            writer.write_shard(shard, corrected)
    full.close()
    finalize_store(out)
    positions = len(style) if meta.top_k else 0
    return ResidualizeResult(
        out=str(out), parent=str(path), parent_fingerprint=parent_fp, report=report,
        positive_scores=float((gaps.teacher - style > 0).mean()) if len(style) else 0.0,
        topk_kl=kl_sum / positions if positions else None, topk_top1_changed=changed / positions if positions else None,
        seconds=time.perf_counter() - t0,
    )


def residualized_record(provenance) -> dict[str, Any] | None:
    """What a run's manifest records about a residualized store (None for a plain one)."""
    return provenance.extra.get(PROVENANCE_KEY)


__all__ = ["METHOD", "ConsistencyReport", "ResidualizeResult", "StoreGaps", "StyleConfig", "StyleFit", "consistency_report",
           "corrected_topk", "fit_style", "residualize_store", "residualized_record"]
