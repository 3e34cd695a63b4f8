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
