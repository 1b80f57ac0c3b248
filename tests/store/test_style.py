"""The cross-teacher style estimate and the residualized store (`megatron_lopd.store.style`).

The estimator is compared with a plain-Python float64 re-derivation (dicts and loops, written
from the module docstring's definition), on a hand-sized example where every rule matters:
rollout weighting, back-off of thin cells, fold exclusion and the average of the two tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from megatron_lopd.errors import ArtifactError, ConfigError, ConsistencyError
from megatron_lopd.store import StoreProvenance, StoreWriter, TeacherStore, finalize_store, verify_store
from megatron_lopd.store.schema import STYLE_RESIDUALIZED, SequenceRecord
from megatron_lopd.store.style import (StoreGaps, StyleConfig, consistency_report, corrected_topk, fit_style, residualize_store)
from tests.store.conftest import PROV, VOCAB, lopd

TOL = 1e-12  # float64 throughout; the two derivations only differ in summation order


def reference_style(tokens, teacher, reference, lengths, vocab, config: StyleConfig, fold, edges):
    """Every token's style offset, straight from the definition (no numpy vectorisation)."""
    rows = []  # (rollout, token, cell, gap)
    start = 0
    for r, n in enumerate(lengths):
        for t in range(n):
            i = start + t
            s = -reference[i]
            sbin = sum(1 for e in edges if s >= e)
            rows.append((r, tokens[i], (t * config.position_bins // n) * config.surprisal_bins + sbin, teacher[i] - reference[i]))
        start += n

    def rollout_means(key_of, rollouts):
        per = defaultdict(list)
        for r, tok, cell, d in rows:
            if r in rollouts:
                per[(r, key_of(tok, cell))].append(d)
        table = defaultdict(list)
        for (r, key), ds in per.items():
            table[key].append(sum(ds) / len(ds))
        return table

    out = []
    for r, tok, cell, d in rows:
        others = {q for q in range(len(lengths)) if fold[q] != fold[r] and lengths[q] > 0}
        means = [sum(d2 for r2, _, _, d2 in rows if r2 == q) / lengths[q] for q in sorted(others)]
        g = sum(means) / len(means)
        tok_table = rollout_means(lambda a, b: a, others)
        cell_table = rollout_means(lambda a, b: b, others)
        tv = sum(tok_table[tok]) / len(tok_table[tok]) if len(tok_table[tok]) >= config.min_count else g
        cv = sum(cell_table[cell]) / len(cell_table[cell]) if len(cell_table[cell]) >= config.min_count else g
        out.append(0.5 * (tv + cv))
    return np.array(out)


def hand_example():
    """8 rollouts over a 6-token vocabulary: a recurring token (5) the teacher dislikes, one rare token (4)."""
    rng = np.random.default_rng(7)
    lengths = [5, 3, 4, 0, 6, 2, 5, 4]  # one empty response: no fold, no weight
    tokens, teacher, reference = [], [], []
    for n in lengths:
        tok = rng.choice([0, 1, 2, 3, 5, 5], size=n)
        if n == 6:
            tok[2] = 4  # token 4 in one rollout only: always backs off
        ref = -rng.exponential(0.7, size=n)
        tokens += tok.tolist()
        reference += ref.tolist()
        teacher += (ref - 2.0 * (tok == 5) + rng.normal(0, 0.3, size=n)).tolist()
    return tokens, teacher, reference, lengths


def test_fit_matches_a_plain_python_reference_with_fold_exclusion_and_backoff():
    tokens, teacher, reference, lengths = hand_example()
    gaps = StoreGaps.of(*_split(tokens, teacher, reference, lengths))
    for config in (StyleConfig(folds=2, position_bins=2, surprisal_bins=2, min_count=2, seed=3),
                   StyleConfig(folds=3, position_bins=3, surprisal_bins=1, min_count=1, seed=0),
                   StyleConfig(folds=7, position_bins=1, surprisal_bins=3, min_count=1, seed=11)):
        fit = fit_style(gaps, 6, config)
        assert sorted(fit.fold[np.array(lengths) > 0] .tolist()) == sorted(np.arange(7) % config.folds)  # dealt by rollout
        assert fit.fold[3] == -1  # the empty response
        want = reference_style(tokens, teacher, reference, lengths, 6, config, fit.fold, fit.surprisal_edges)
        np.testing.assert_allclose(fit.style, want, rtol=0, atol=TOL)
    # Token 4 sits in one rollout: below min_count=2, it takes that fold's global mean.
    fit = fit_style(gaps, 6, StyleConfig(folds=2, position_bins=2, surprisal_bins=2, min_count=2, seed=3))
    at4 = np.flatnonzero(np.array(tokens) == 4)[0]
    assert fit.token_part[at4] == fit.global_means[fit.fold[fit_rollout(lengths, at4)]]
    # The recurring token 5 is the style: its table value is far below the others'.
    k = fit.fold[fit_rollout(lengths, at4)]
    assert fit.token_tables[k, 5] < fit.token_tables[k, [0, 1, 2, 3]].max() - 1.0


def fit_rollout(lengths, token_index):
    return int(np.searchsorted(np.cumsum(lengths), token_index, side="right"))


def _split(tokens, teacher, reference, lengths):
    cuts = np.cumsum(lengths)[:-1]
    return [np.split(np.array(x), cuts) for x in (tokens, teacher, reference)]


def test_a_rollouts_correction_never_uses_its_own_tokens():
    tokens, teacher, reference, lengths = hand_example()
    config = StyleConfig(folds=4, position_bins=2, surprisal_bins=2, min_count=1, seed=5)
    base = fit_style(StoreGaps.of(*_split(tokens, teacher, reference, lengths)), 6, config)
    starts = np.cumsum(lengths) - lengths
    for r in (0, 4, 6):  # move one rollout's teacher scores a lot: only the other folds' estimates may change
        moved = np.array(teacher, dtype=float)
        moved[starts[r]:starts[r] + lengths[r]] -= 5.0
        fit = fit_style(StoreGaps.of(*_split(tokens, moved.tolist(), reference, lengths)), 6, config)
        same_fold = np.repeat(base.fold, lengths) == base.fold[r]
        np.testing.assert_array_equal(fit.style[same_fold], base.style[same_fold])
        assert np.abs(fit.style[~same_fold] - base.style[~same_fold]).max() > 0.1


def test_corrected_topk_matches_the_formula():
    rng = np.random.default_rng(0)
    R, k, V = 6, 4, 20
    logits = rng.normal(size=(R, V)) * 2
    full = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-full, 1)[:, :k]
    lp = np.take_along_axis(full, ids, 1)
    table = rng.normal(size=V)
    g = -0.7
    new_ids, new_lp, kl = corrected_topk(ids, lp, table[ids], np.full(R, g))
    for t in range(R):  # p'(v) ~ p(v) exp(-table(v)/2) on the top-k, tail * exp(-g/2)
        w = {int(v): math.exp(full[t, v] - 0.5 * table[v]) for v in ids[t]}
        tail = 1 - sum(math.exp(full[t, v]) for v in ids[t])
        z = sum(w.values()) + tail * math.exp(-0.5 * g)
        want = sorted(((math.log(x / z), v) for v, x in w.items()), reverse=True)
        assert [v for _, v in want] == new_ids[t].tolist()
        np.testing.assert_allclose(new_lp[t], [x for x, _ in want], rtol=0, atol=1e-12)
        p = [math.exp(full[t, v]) for v in ids[t]] + [tail]
        q = [w[int(v)] / z for v in ids[t]] + [tail * math.exp(-0.5 * g) / z]
        assert abs(kl[t] - sum(a * math.log(a / b) for a, b in zip(p, q))) < 1e-12
        assert np.all(np.diff(new_lp[t]) <= 0) and np.exp(new_lp[t]).sum() < 1


# ---------------------------------------------------------------------------------------
# Stores


def style_records(n: int, seed: int = 0, *, k: int = 3, rollout: bool = True) -> list[SequenceRecord]:
    """Scored rollouts whose teacher dislikes token 7 by 2 nats (a style) on top of noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        R = int(rng.integers(3, 12))
        logits = rng.normal(size=(R, 40))
        full = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        resp = rng.integers(0, 40, size=R)
        resp[rng.random(R) < 0.3] = 7
        teacher = full[np.arange(R), resp] - 2.0 * (resp == 7)
        full[np.arange(R), resp] = teacher  # keep the top-k consistent with the sampled score
        ids = np.argsort(-full, 1)[:, :k]
        lp = np.minimum(np.take_along_axis(full, ids, 1), 0)
        ref = -rng.exponential(1.0, size=R)
        out.append(SequenceRecord(np.array([1, 2, 3], np.int32), resp.astype(np.int32), teacher.astype(np.float32),
                                  ids.astype(np.int32) if k else None, lp.astype(np.float16) if k else None,
                                  ref.astype(np.float32) if rollout else None, f"p{i}", 0))
    return out


def write(path: Path, records, *, k: int = 3, rollout: bool = True) -> Path:
    w = StoreWriter.create(path, num_sequences=len(records), top_k=k, vocab_size=VOCAB, provenance=StoreProvenance(**PROV),
                           sequences_per_shard=16, has_rollout_logprobs=rollout, chunk_tokens=64, fsync=False)
    for s in w.pending_shards():
        r = w.shard_range(s)
        w.write_shard(s, records[r.start:r.stop])
    finalize_store(path)
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return write(tmp_path_factory.mktemp("style") / "parent.zarr", style_records(60))


CONFIG = StyleConfig(folds=3, position_bins=2, surprisal_bins=2, min_count=2, seed=1)


def array_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted((path / "shards").rglob("*")) if p.is_file() and p.name != "zarr.json"}


def test_residualized_store_content_provenance_and_determinism(parent, tmp_path):
    before = array_files(parent)
    result = residualize_store(parent, tmp_path / "a.zarr", CONFIG)
    assert array_files(parent) == before  # the parent is never modified
    assert verify_store(tmp_path / "a.zarr").ok
    out, src = TeacherStore.open(tmp_path / "a.zarr"), TeacherStore.open(parent)
    assert out.meta.teacher_signal == STYLE_RESIDUALIZED and out.meta.residualized and not src.meta.residualized
    # The sampled-token scores are the parent's minus the cross-fitted estimate, token for token.
    gaps = StoreGaps.of([r.response_ids for r in src], [r.teacher_logprobs for r in src], [r.rollout_logprobs for r in src])
    fit = fit_style(gaps, VOCAB, CONFIG)
    got = np.concatenate([r.teacher_logprobs for r in out])
    np.testing.assert_allclose(got, (gaps.teacher - fit.style).astype(np.float32), rtol=0, atol=0)
    for a, b in zip(out, src):  # everything else carried over unchanged
        for name in ("prompt_ids", "response_ids", "rollout_logprobs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.prompt_id, a.sample_index) == (b.prompt_id, b.sample_index)
        assert np.all(np.diff(a.topk_logprobs.astype(np.float32), axis=1) <= 0)
        assert np.exp(a.topk_logprobs.astype(np.float64)).sum(1).max() <= 1 + 2e-3  # renormalised with the tail (fp16)
    prov = out.provenance
    rec = prov.extra["style_residualized"]
    assert rec["parent_fingerprint"] == result.parent_fingerprint and rec["parent_fingerprint"].startswith("store-")
    assert rec["parent_store"] == str(parent.resolve()) and rec["params"] == dataclasses.asdict(CONFIG)
    assert "Lightning OPD 2.0" in rec["method"] and prov.engine == "lopd store residualize"
    assert prov.teacher_fingerprint == src.provenance.teacher_fingerprint  # the same teacher's scores, corrected
    assert rec["residual_share_over_1nat"] < rec["gap_share_over_1nat"]  # the planted 2-nat style is removed
    assert 0 < result.topk_top1_changed < 1 and result.topk_kl > 0
    # Byte-identical for a fixed seed; another seed deals other folds.
    residualize_store(parent, tmp_path / "b.zarr", CONFIG)
    assert array_files(tmp_path / "a.zarr") == array_files(tmp_path / "b.zarr")
    residualize_store(parent, tmp_path / "c.zarr", dataclasses.replace(CONFIG, seed=2))
    assert array_files(tmp_path / "a.zarr") != array_files(tmp_path / "c.zarr")


def test_consistency_report_sees_the_planted_style(parent):
    report = consistency_report(parent, CONFIG)
    assert report.tokens == sum(len(r.response_ids) for r in style_records(60))
    assert report.recurring[0]["token"] == 7 and report.recurring[0]["mean_gap"] < -1.0
    assert report.explained["token"] > 0.2 and report.residual["share_over_1nat"] < report.gap["share_over_1nat"]
    text = "\n".join(report.lines())
    assert "disagrees with R systematically" in text and "lopd store residualize" in text


def test_bad_input_one_line_and_nothing_written(parent, tmp_path):
    cases = {
        "no lpR": (write(tmp_path / "nolp.zarr", style_records(30, rollout=False), rollout=False), CONFIG,
                   "holds no rollout log-probs", "--record-logprobs"),
        "too few rollouts": (parent, StyleConfig(folds=10, min_count=7), "60 non-empty rollouts are too few for 10 folds", "fewer --folds"),
        "empty position bin": (parent, StyleConfig(folds=2, min_count=1, position_bins=20), "response-position bin", "fewer --position-bins"),
        "config": (parent, StyleConfig(folds=1), "folds=1 must be an integer >= 2", "--folds 2"),
    }
    for name, (store, config, what, fix) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        with pytest.raises((ArtifactError, ConfigError)) as info:
            residualize_store(store, out, config)
        assert what in info.value.what and fix in info.value.fix and "\n" not in str(info.value), (name, str(info.value))
        assert not out.exists(), name
    # Surprisal bins that tie: R certain (lpR = 0) at most tokens.
    tied = style_records(30)
    for r in tied:
        r.rollout_logprobs = np.zeros_like(r.rollout_logprobs)
    with pytest.raises(ArtifactError, match="R-surprisal bin 0 of 2 holds no tokens.*1 distinct values"):
        residualize_store(write(tmp_path / "tied.zarr", tied), tmp_path / "o", StyleConfig(folds=2, min_count=1, surprisal_bins=2))
    # A residualized store is refused a second pass; --out on the parent itself is refused.
    once = residualize_store(parent, tmp_path / "once.zarr", CONFIG).out
    with pytest.raises(ArtifactError, match="already style-residualized"):
        residualize_store(once, tmp_path / "twice.zarr", CONFIG)
    with pytest.raises(ConfigError, match="is the store being corrected"):
        residualize_store(parent, parent, CONFIG)
    assert not (tmp_path / "twice.zarr").exists()
    # An existing complete output needs --overwrite; with it, the result is rewritten identically.
    with pytest.raises(ArtifactError, match="already exists and is complete"):
        residualize_store(parent, once, CONFIG)
    first = array_files(Path(once))
    residualize_store(parent, once, CONFIG, overwrite=True)
    assert array_files(Path(once)) == first


def test_cli_consistency_residualize_inspect_and_the_trainers_rule(parent, tmp_path):
    from megatron_lopd.provenance import Lineage

    args = ["--folds", "3", "--position-bins", "2", "--surprisal-bins", "2", "--min-count", "2", "--seed", "1"]
    out = lopd("store", "consistency", str(parent), "--json", *args)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recurring"][0]["token"] == 7
    out = lopd("store", "residualize", str(parent), "--out", str(tmp_path / "r.zarr"), "--no-progress", *args)
    assert out.returncode == 0, out.stderr
    assert "wrote " in out.stdout and "provenance names the parent store-" in out.stdout
    assert array_files(tmp_path / "r.zarr") == array_files(Path(residualize_store(parent, tmp_path / "py.zarr", CONFIG).out))
    out = lopd("store", "inspect", str(tmp_path / "r.zarr"), "--consistency", *args)
    assert out.returncode == 0 and "teacher signal style_residualized" in out.stdout and "style explains" in out.stdout, out.stdout
    out = lopd("store", "residualize", str(tmp_path / "r.zarr"), "--out", str(tmp_path / "rr.zarr"))
    assert out.returncode != 0 and "already style-residualized" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # The trainer's rule: another teacher's store is refused naming both ways out; a residualized one is accepted.
    lineage = dict(teacher="model-B", sft_data_writer="model-A", rollout_policy="model-R", start="model-R")
    with pytest.raises(ConsistencyError) as info:
        Lineage(**lineage).check(require_sft_data_writer=True, require_start=True)
    assert "re-score the rollouts with the model that wrote the SFT data" in info.value.fix and "lopd store residualize" in info.value.fix
    assert Lineage(**lineage, teacher_residualized=True).check(require_sft_data_writer=True, require_start=True) == []
