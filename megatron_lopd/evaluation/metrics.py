"""Accuracy metrics over k samples per problem: avg@k and the unbiased pass@k."""

from __future__ import annotations

from typing import Sequence

from megatron_lopd.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials
    (C(64, 32) is ~1.8e18) and stays accurate for any n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})", "use k <= samples per problem")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def report_ks(samples_per_problem: int) -> list[int]:
    """The k to report pass@k for: 1, 4, 16, ... up to K, and K itself."""
    ks, k = [], 1
    while k < samples_per_problem:
        ks.append(k)
        k *= 4
    return ks + [samples_per_problem]


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems, each with `n` samples of which `correct_counts[i]` are correct."""
    if not correct_counts:
        raise ConfigError("no problems to compute pass@k over", "evaluate at least one problem")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
