"""pass@k against its closed form 1 - C(n-c, k) / C(n, k), computed exactly with integers."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.evaluation.metrics import mean_pass_at_k, pass_at_k, report_ks


def closed_form(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize(
    "n,c,k",
    [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (4, 2, 4), (4, 3, 2), (10, 3, 4), (16, 1, 16), (16, 15, 4),
     (64, 1, 1), (64, 1, 16), (64, 5, 16), (64, 32, 32), (64, 63, 64), (64, 0, 64), (200, 7, 100)],
)
def test_pass_at_k_matches_closed_form(n, c, k):
    # The product form avoids huge binomials; compare with exact rational arithmetic. Tolerance 1e-12.
    assert pass_at_k(n, c, k) == pytest.approx(float(closed_form(n, c, k)), abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_edge_cases():
    assert pass_at_k(64, 17, 1) == pytest.approx(17 / 64, abs=1e-15)
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k: every 4-subset has a correct one
    assert pass_at_k(8, 8, 8) == 1.0


def test_hand_counts():
    # n=4, c=1, k=2: the 3 of 6 pairs that contain the correct sample -> 1/2.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # n=4, c=2, k=2: 5 of 6 pairs contain a correct one.
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)
    # Mean over problems with counts (0, 1, 2, 4) of 4, k=2: (0 + 1/2 + 5/6 + 1) / 4.
    assert mean_pass_at_k([0, 1, 2, 4], 4, 2) == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4, abs=1e-15)


def test_report_ks():
    assert report_ks(1) == [1]
    assert report_ks(4) == [1, 4]
    assert report_ks(10) == [1, 4, 10]
    assert report_ks(64) == [1, 4, 16, 64]


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ConfigError):
        pass_at_k(n, c, k)
