"""Confidence intervals for evaluation figures: pure functions on per-problem values.

At this project's scale GSM8K accuracy is a few percent and its noise is as large as the
effects being compared, so every mean comes with an interval. Percentile bootstrap: it needs
no distributional assumption and handles 0/1 accuracies and continuous scores alike.
"""

from __future__ import annotations

import statistics

import numpy as np

CI_LEVEL = 0.95


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
