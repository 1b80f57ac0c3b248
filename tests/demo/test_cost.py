"""The GPU-hours model at the paper's sizes (megatron_lopd/demo/cost.py), re-derived by hand."""

from __future__ import annotations

import pytest

from megatron_lopd.demo.cost import PaperSetting, cost_lines, cost_model, measured_small_batch_penalty
from tests.demo.test_report import _summary


def test_lightning_split_is_reproduced_and_online_follows_the_token_counts():
    m = cost_model()
    tokens = 17_398 * 3_200  # rollouts x (200 prompt + 3,000 response)
    peak = 989e12
    # Implied efficiency of each phase, straight from its FLOPs and the paper's hours.
    assert m["efficiency"]["scoring"] == pytest.approx(2 * 32.8e9 * tokens / (4 * 3600 * peak), rel=1e-12)
    assert m["efficiency"]["rollouts"] == pytest.approx(2 * 8.19e9 * tokens / (10 * 3600 * peak), rel=1e-12)
    assert m["efficiency"]["training"] == pytest.approx(6 * 8.19e9 * 150 * 256 * 3_200 / (16 * 3600 * peak), rel=1e-12)
    fresh = 150 * 256 / 17_398  # online samples and scores every training sequence anew
    assert m["online_hours"]["rollouts"] == pytest.approx(10 * fresh) and m["online_hours"]["scoring"] == pytest.approx(4 * fresh)
    assert m["online_hours"]["training"] == pytest.approx(16) and m["lightning_total"] == 30
    assert m["ratio"] == pytest.approx((14 * fresh + 16) / 30) and m["paper_ratio"] == pytest.approx(4.0)
    slow = cost_model(small_batch_penalty=3.0)  # the penalty slows generation only
    assert slow["online_hours"]["rollouts"] == pytest.approx(30 * fresh) and slow["online_hours"]["scoring"] == m["online_hours"]["scoring"]
    assert cost_model(PaperSetting(response_tokens=1_000))["online_total"] == pytest.approx(m["online_total"])  # calibrated: length cancels


def test_measured_penalty_and_the_report_section():
    s = _summary([1, 0] * 20, {"lightning": [1] * 40, "online": [1] * 40})
    assert measured_small_batch_penalty(s) is None  # no online statistics: only the model without a penalty
    s["store"]["response_tokens"] = 1000
    s["wall_clock_s"]["stages"]["rollouts"] = 5.0  # offline: 200 tok/s
    s["variants"]["online"]["online_stats"] = {"sampled_tokens": 800, "generate_s": 10.0}  # online: 80 tok/s
    assert measured_small_batch_penalty(s) == pytest.approx(2.5)
    text = "\n".join(cost_lines(s))
    assert "| rollouts | 10 | 2.6 % | 22.1 | 55.2 |" in text and "the paper reports 4.0x (120 h)" in text
    assert "2.21x the sequences" in text
