"""The demo over seeds (megatron_lopd/demo/aggregate.py): means, spreads and sentences from per-seed summaries."""

from __future__ import annotations

import copy
import json
import statistics

import pytest

from megatron_lopd.demo import aggregate as agg_mod
from megatron_lopd.demo.report import paired_diff
from tests.demo.test_report import _summary

R = [1] * 200 + [0] * 200


def seed_summary(seed: int, topk_right: int, online_right: int) -> dict:
    s = _summary(R, {"lightning": list(R), "lightning_topk": [1] * topk_right + [0] * (400 - topk_right), "offline_teacher_b": [0] * 400,
                     "online": [1] * online_right + [0] * (400 - online_right), "continued_sft": list(R)})
    s["seed"] = seed
    return s


def test_means_spreads_and_paired_differences_over_seeds():
    seeds = [seed_summary(0, 300, 300), seed_summary(1, 320, 300), seed_summary(2, 280, 330)]
    agg = agg_mod.aggregate(seeds)
    assert agg["seeds"] == [0, 1, 2]
    topk = agg["accuracy"]["lightning_topk"]
    per = [75.0, 80.0, 70.0]
    assert topk["per_seed"] == per and topk["mean"] == pytest.approx(statistics.mean(per)) and topk["sd"] == pytest.approx(statistics.stdev(per))
    diffs = {(d["a"], d["b"]): d for d in agg["differences"]}
    online = diffs[("lightning_topk", "online")]
    want = [paired_diff(s["paired_correct"]["lightning_topk"], s["paired_correct"]["online"]).points for s in seeds]
    assert online["per_seed"] == pytest.approx(want) and online["mean"] == pytest.approx(statistics.mean(want))
    assert online["sd"] == pytest.approx(statistics.stdev(want))
    # Sentences: every seed beyond 2 SE -> a real difference; none -> within; a split -> "not settled".
    assert "above 0 beyond 2 SE in every seed" in agg_mod.reading(diffs[("lightning_topk", "sft_R")], 3)
    assert "within 2 SE of 0 in every seed" in agg_mod.reading(diffs[("lightning", "sft_R")], 3)
    assert "above 0 beyond 2 SE in every seed" in agg_mod.reading(diffs[("lightning_topk", "offline_teacher_b")], 3)
    assert online["above"] == 1 and online["below"] == 1 and "not settled: beyond 2 SE above 0 in 1, below 0 in 1, within in 1" in agg_mod.reading(online, 3)
    one = agg_mod.aggregate(seeds[:1])
    assert one["accuracy"]["lightning_topk"]["sd"] == 0.0
    other = copy.deepcopy(seeds[1])
    other["sizes"]["opd_steps"] = 99
    with pytest.raises(ValueError, match="different sizes"):
        agg_mod.aggregate([seeds[0], other])


def test_write_aggregate_files(tmp_path):
    seeds = [seed_summary(0, 300, 310), seed_summary(4, 320, 300)]
    agg = agg_mod.write_aggregate(tmp_path, seeds)
    md = (tmp_path / "aggregate.md").read_text()
    assert "# Lightning OPD demo over 2 seeds (0, 4)" in md and "| lightning_topk | 77.5 +- 3.5 | 75.0 | 80.0 |" in md
    assert json.loads((tmp_path / "aggregate.json").read_text()) == json.loads(json.dumps(agg))
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "lightning_topk" in agg_mod.console_aggregate(agg, tmp_path)


def test_a_seed_whose_teacher_did_not_learn_is_named():
    broken = seed_summary(2, 300, 300)
    broken["accuracy"]["teacher_a"]["pass1"] = 0.06
    from megatron_lopd.demo.report import findings

    assert findings(broken)[0].startswith("**This seed's teacher A did not learn the task** (greedy pass@1 6.0%, below 90 %)")
    agg = agg_mod.aggregate([seed_summary(0, 300, 300), broken])
    assert agg["teachers_failed"] == {2: ["teacher_a"]}
    assert "Seeds whose teachers did not learn the task** (greedy pass@1 below 90 %): seed 2: teacher A." in agg_mod.aggregate_markdown(agg)
    assert agg_mod.aggregate([seed_summary(0, 300, 300)])["teachers_failed"] == {}
