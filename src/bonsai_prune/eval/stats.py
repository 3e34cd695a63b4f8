"""Confidence intervals for evaluation figures: pure functions on per-problem values.

At this project's scale GSM8K accuracy is a few percent and its noise is as large as the
effects being compared, so every mean comes with an interval. Proportions (accuracies) get
Wilson score intervals: a percentile bootstrap of 0 successes in 96 is the point [0, 0],
which claims a certainty no sample of 96 gives; Wilson's is [0, 3.8]%. Continuous scores (U†)
get a percentile bootstrap, which needs no distributional assumption.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CI_LEVEL = 0.95


def wilson_interval(successes: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion: ``successes`` of ``n`` trials (0 <= k <= n, n >= 1).

    Never collapses to a point at 0 or n, unlike the normal approximation or the bootstrap.
    """
    if n < 1 or not 0 <= successes <= n or not 0 < level < 1:
        raise ValueError(
            f"need 0 <= successes <= n, n >= 1 and level in (0, 1), got {successes}, {n}, {level}"
        )
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values, n_resamples: int, seed: int, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values``.

    Args:
        values: (n,) per-item scores, n >= 1.
        n_resamples: how many resamples of the n items (with replacement) to draw.
        seed: seeds a numpy Generator, so the interval is reproducible.
        level: coverage in (0, 1), e.g. 0.95 for the 2.5th and 97.5th percentiles.
    """
    values = np.asarray(values, dtype=np.float64)  # (n,)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1-d sequence of values, got shape {values.shape}")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and level in (0, 1), got {n_resamples}, {level}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(n_resamples, values.size))  # (R, n)
    means = values[index].mean(axis=1)  # (R,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference(
    values: list[float | None], baseline: list[float | None], n_resamples: int, seed: int
) -> tuple[float, float, float] | None:
    """Mean of ``values[i] - baseline[i]`` and its percentile-bootstrap 95% CI.

    Items where either side is missing (None) are left out; None if no item is left or the
    lists are not the same problems (different lengths).
    """
    if len(values) != len(baseline):
        return None
    diffs = [
        a - b for a, b in zip(values, baseline, strict=True) if a is not None and b is not None
    ]
    if not diffs:
        return None
    low, high = bootstrap_ci(diffs, n_resamples, seed)
    return statistics.fmean(diffs), low, high


def paired_ratio(
    values: list[float | None],
    baseline: list[float | None],
    n_resamples: int,
    seed: int,
    level: float = CI_LEVEL,
) -> tuple[float, float, float] | None:
    """``mean(values) / mean(baseline)`` over the same items (a pruned model's accuracy kept
    relative to its dense parent's) and its paired percentile-bootstrap CI.

    Both sides are resampled with the same item indices, so how hard the drawn problems are
    cancels, as in :func:`paired_difference`. Resamples whose baseline mean is 0 have no ratio
    and are left out. None if the lists differ in length, no item is left or the baseline
    mean is 0.
    """
    if len(values) != len(baseline):
        return None
    pairs = np.asarray(
        [(a, b) for a, b in zip(values, baseline, strict=True) if a is not None and b is not None],
        dtype=np.float64,
    )  # (n, 2)
    if pairs.size == 0 or pairs[:, 1].mean() == 0:
        return None
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(pairs), size=(n_resamples, len(pairs)))  # (R, n)
    means = pairs[index].mean(axis=1)  # (R, 2)
    ratios = means[means[:, 1] > 0, 0] / means[means[:, 1] > 0, 1]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(pairs[:, 0].mean() / pairs[:, 1].mean()), float(low), float(high)


# --- paired proportions: Wilson limits combined (MOVER) --------------------------------------
# A pruned model that solves none of 300 problems has a kept share of exactly 0 in every
# bootstrap resample: the percentile interval is the point [0, 0], the certainty Wilson's
# interval refuses for one proportion. The intervals below combine each side's Wilson limits
# and the per-problem correlation of the two sides (the method of variance estimates recovery:
# Newcombe 1998, method 10, for the difference; Zou & Donner 2008 for the ratio), so they stay
# open at 0 successes and keep close to their nominal coverage at the few-percent accuracies
# of this project (tests/test_stats.py simulates it).


@dataclass(frozen=True)
class _PairedProportions:
    """Two proportions on the same items: each one's estimate and Wilson limits, and the phi
    correlation of the two per-item indicators as Newcombe (1998) takes it (0 where one side
    is constant)."""

    p: tuple[float, float]
    low: tuple[float, float]
    high: tuple[float, float]
    phi: float


def _paired_proportions(
    values: list[float | None], baseline: list[float | None], level: float
) -> _PairedProportions | None:
    if len(values) != len(baseline):
        return None
    pairs = [
        (a, b) for a, b in zip(values, baseline, strict=True) if a is not None and b is not None
    ]
    if not pairs:
        return None
    if any(v not in (0, 1) for pair in pairs for v in pair):
        raise ValueError("paired proportions need per-item values of 0 or 1 (solved or not)")
    n = len(pairs)
    both = sum(1 for a, b in pairs if a and b)
    first_only = sum(1 for a, b in pairs if a and not b)
    second_only = sum(1 for a, b in pairs if b and not a)
    neither = n - both - first_only - second_only
    k = (both + first_only, both + second_only)
    spread = (both + first_only) * (second_only + neither) * (both + second_only)
    spread *= first_only + neither
    # Newcombe's phi: a positive association is shrunk by n/2 (and to 0 below it), which widens
    # the interval where the correlation would narrow it
    association = both * neither - first_only * second_only
    association = max(0.0, association - n / 2) if association > 0 else association
    phi = association / math.sqrt(spread) if spread else 0.0
    limits = [wilson_interval(count, n, level) for count in k]
    return _PairedProportions(
        p=(k[0] / n, k[1] / n),
        low=(limits[0][0], limits[1][0]),
        high=(limits[0][1], limits[1][1]),
        phi=phi,
    )


def _combined(a: float, b: float, phi: float) -> float:
    """sqrt(a^2 - 2 phi a b + b^2): the half-width MOVER gives ``x - y`` from the half-widths
    ``a`` of x and ``b`` of y on the side each limit moves."""
    return math.sqrt(max(0.0, a * a - 2.0 * phi * a * b + b * b))


def paired_proportion_difference(
    values: list[float | None], baseline: list[float | None], level: float = CI_LEVEL
) -> tuple[float, float, float] | None:
    """``mean(values) - mean(baseline)`` of per-item 0/1 outcomes on the same items, with
    Newcombe's (1998, method 10) interval: each side's Wilson limits combined through the
    per-item correlation. Items missing on either side are left out; None if none is left or
    the lists differ in length."""
    s = _paired_proportions(values, baseline, level)
    if s is None:
        return None
    (p1, p2), (l1, l2), (u1, u2) = s.p, s.low, s.high
    diff = p1 - p2
    return (
        diff,
        diff - _combined(p1 - l1, u2 - p2, s.phi),
        diff + _combined(u1 - p1, p2 - l2, s.phi),
    )


def paired_proportion_ratio(
    values: list[float | None], baseline: list[float | None], level: float = CI_LEVEL
) -> tuple[float, float, float] | None:
    """``mean(values) / mean(baseline)`` of per-item 0/1 outcomes on the same items (a pruned
    model's accuracy kept relative to its dense parent's), with a MOVER interval: the ratios
    ``r`` for which Newcombe's interval of ``values - r * baseline`` holds 0 (Zou & Donner
    2008). The upper limit is ``inf`` where the baseline's Wilson lower limit is 0. None if the
    lists differ in length, no item is left or the baseline solved none."""
    s = _paired_proportions(values, baseline, level)
    if s is None or s.p[1] == 0:
        return None
    (p1, p2), (l1, l2), (u1, u2) = s.p, s.low, s.high
    ratio = p1 / p2

    def lowest(r: float) -> float:  # lower limit of values - r * baseline: falls as r grows
        return p1 - r * p2 - _combined(p1 - l1, r * (u2 - p2), s.phi)

    def highest(r: float) -> float:  # upper limit of values - r * baseline: falls as r grows
        return p1 - r * p2 + _combined(u1 - p1, r * (p2 - l2), s.phi)

    low = _root(lowest, 0.0, ratio)  # lowest(0) = l1 >= 0 >= lowest(ratio)
    if l2 <= 0:
        return ratio, low, math.inf
    high = max(ratio, 1.0)
    while highest(high) >= 0:  # highest(r) ~ -r * l2 for large r: a bracket is found
        high *= 2.0
    return ratio, low, _root(highest, ratio, high)


def _root(f, a: float, b: float, iterations: int = 100) -> float:
    """A zero of ``f`` on [a, b] where f(a) >= 0 >= f(b), by bisection (to float precision)."""
    for _ in range(iterations):
        middle = (a + b) / 2.0
        if f(middle) >= 0:
            a = middle
        else:
            b = middle
    return (a + b) / 2.0


def welch_difference(
    a: list[float], b: list[float], level: float = CI_LEVEL
) -> tuple[float, float, float] | None:
    """``mean(a) - mean(b)`` of two independent samples with Welch's t interval (unequal
    variances, Welch-Satterthwaite degrees of freedom); None with fewer than two values on a
    side. For figures over a few seeds: with 3 against 3 the t quantile is ~4, not 1.96, and
    the interval says how little three pruning runs settle."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t as student_t  # deferred: a slow import

    difference = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return difference, difference, difference
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student_t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)
    return difference, difference - half, difference + half
