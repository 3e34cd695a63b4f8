"""Confidence intervals on hand-made data: the bootstrap and paired differences."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from bonsai_prune.eval.stats import (
    bootstrap_ci,
    paired_difference,
    paired_proportion_difference,
    paired_proportion_ratio,
    paired_ratio,
    welch_difference,
    wilson_interval,
)

# --- bootstrap_ci -------------------------------------------------------------------------------


def test_bootstrap_of_constant_values_is_a_point():
    assert bootstrap_ci([1.0] * 20, n_resamples=200, seed=0) == (1.0, 1.0)


def test_bootstrap_of_a_fair_coin_covers_half_and_shrinks_with_n():
    small = bootstrap_ci([0.0, 1.0] * 20, n_resamples=2000, seed=0)  # n = 40
    large = bootstrap_ci([0.0, 1.0] * 500, n_resamples=2000, seed=0)  # n = 1000
    for low, high in (small, large):
        assert 0.0 <= low < 0.5 < high <= 1.0
    assert large[1] - large[0] < small[1] - small[0]
    # the binomial standard error at n=40 is 0.079: a 95% interval is about 0.31 wide
    assert small[1] - small[0] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 40), abs=0.06)


def test_bootstrap_is_reproducible_and_narrows_with_lower_level():
    values = [0.0, 0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    assert bootstrap_ci(values, 500, seed=3) == bootstrap_ci(values, 500, seed=3)
    wide = bootstrap_ci(values, 500, seed=3, level=0.95)
    narrow = bootstrap_ci(values, 500, seed=3, level=0.5)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


@pytest.mark.parametrize(
    "values, n_resamples, level", [([], 10, 0.95), ([1.0], 0, 0.95), ([1.0], 10, 1.0)]
)
def test_bootstrap_rejects_bad_arguments(values, n_resamples, level):
    with pytest.raises(ValueError):
        bootstrap_ci(values, n_resamples, seed=0, level=level)


# --- paired_difference ----------------------------------------------------------------------


def test_paired_difference_is_the_mean_per_item_difference_with_a_tight_ci():
    # b is a plus 1 with a little noise; a spans a wide range, so unpaired CIs would overlap
    a = [float(v) for v in range(0, 100, 2)]
    b = [v + 1.0 + (0.1 if i % 2 else -0.1) for i, v in enumerate(a)]
    mean, low, high = paired_difference(b, a, 500, 0)
    assert mean == pytest.approx(1.0) and 0.9 < low <= mean <= high < 1.1
    assert paired_difference([1.0, None, 3.0], [0.0, 5.0, None], 100, 0)[0] == pytest.approx(1.0)
    assert paired_difference([1.0, 2.0], [1.0], 100, 0) is None  # not the same problems
    assert paired_difference([None], [1.0], 100, 0) is None


def test_wilson_interval_of_zero_successes_is_not_a_point():
    low, high = wilson_interval(0, 96)
    assert low == 0.0 and high == pytest.approx(0.0385, abs=5e-4)  # [0, 3.8]%, not [0, 0]
    low, high = wilson_interval(96, 96)
    assert high == 1.0 and low == pytest.approx(1 - 0.0385, abs=5e-4)


@pytest.mark.parametrize(("k", "n"), [(4, 128), (1, 3), (50, 100), (7, 96)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_wilson_interval_narrows_with_n():
    low, high = wilson_interval(4, 128)
    assert wilson_interval(40, 1280)[1] - wilson_interval(40, 1280)[0] < high - low


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, 0)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_paired_ratio_is_the_ratio_of_means_with_a_paired_ci():
    dense = [1.0, 0.0, 1.0, 0.0] * 25  # 50%
    pruned = [1.0, 0.0, 0.0, 0.0] * 25  # 25%: half of the dense model's hits kept
    ratio, low, high = paired_ratio(pruned, dense, 500, 0)
    assert ratio == pytest.approx(0.5) and low < 0.5 < high and 0 <= low and high <= 1.0
    assert paired_ratio(pruned, dense, 500, 0) == (ratio, low, high)  # seeded
    assert paired_ratio([1.0], [0.0], 100, 0) is None  # nothing to keep a share of
    assert paired_ratio([1.0, 0.0], [1.0], 100, 0) is None  # not the same problems


# --- paired proportions (Wilson limits combined) ----------------------------------------------


def _paired_sample(rng, n: int, both: float, first_only: float, second_only: float):
    """n items' 0/1 outcomes of two models with the given joint probabilities."""
    cells = rng.choice(
        4, size=n, p=[both, first_only, second_only, 1 - both - first_only - second_only]
    )
    first = ((cells == 0) | (cells == 1)).astype(float).tolist()
    second = ((cells == 0) | (cells == 2)).astype(float).tolist()
    return first, second


def test_a_model_that_solved_none_keeps_an_open_interval():
    dense = [1.0] * 5 + [0.0] * 295  # 5 of 300, as the packaged model on the study's problems
    pruned = [0.0] * 300
    assert paired_ratio(pruned, dense, 1000, 0)[1:] == (0.0, 0.0)  # the bootstrap's point
    ratio, low, high = paired_proportion_ratio(pruned, dense)
    assert ratio == 0.0 and low == 0.0 and 0.5 < high < 1.0
    diff, low, high = paired_proportion_difference(pruned, dense)
    assert diff == pytest.approx(-5 / 300) and low < diff < high < 0


def test_paired_proportion_intervals_hold_the_estimate_and_match_the_ratio():
    dense = [1.0, 0.0, 1.0, 0.0] * 25
    pruned = [1.0, 0.0, 0.0, 0.0] * 25
    ratio, low, high = paired_proportion_ratio(pruned, dense)
    assert ratio == pytest.approx(0.5) and 0 < low < 0.5 < high <= 1.0  # pruned hits ⊂ dense's
    same = paired_proportion_ratio(dense, dense)
    assert same[0] == 1.0 and same[1] < 1.0 < same[2]
    diff = paired_proportion_difference(pruned, dense)
    assert diff[0] == pytest.approx(-0.25) and diff[1] < -0.25 < diff[2]
    assert paired_proportion_ratio([1.0], [0.0]) is None  # nothing to keep a share of
    assert paired_proportion_ratio([1.0, 0.0], [1.0]) is None  # not the same problems
    assert paired_proportion_ratio([None, 1.0], [1.0, None]) is None  # no pair left
    with pytest.raises(ValueError, match="0 or 1"):
        paired_proportion_ratio([0.5, 1.0], [1.0, 1.0])


@pytest.mark.parametrize(
    ("both", "first_only", "second_only"),
    [(0.0, 0.003, 0.017), (0.005, 0.005, 0.012), (0.2, 0.1, 0.1)],
)
def test_paired_proportion_intervals_cover_the_truth(both, first_only, second_only):
    """At this project's accuracies (a few solved in 300) the intervals keep their 95%: the
    percentile bootstrap of the ratio covered 58% in the first case (measured when written)."""
    rng = np.random.default_rng(0)
    true_ratio = (both + first_only) / (both + second_only)
    true_diff = first_only - second_only
    ratios = diffs = trials = 0
    while trials < 400:
        first, second = _paired_sample(rng, 300, both, first_only, second_only)
        if not any(second):
            continue
        trials += 1
        _, low, high = paired_proportion_ratio(first, second)
        ratios += low <= true_ratio <= high
        _, low, high = paired_proportion_difference(first, second)
        diffs += low <= true_diff <= high
    assert ratios / trials >= 0.92 and diffs / trials >= 0.92


def test_welch_difference_matches_scipy_and_needs_two_seeds_a_side():
    from scipy.stats import ttest_ind

    a, b = [17.1, 18.8, 16.9], [15.0, 19.4, 11.0]
    difference, low, high = welch_difference(a, b)
    reference = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert difference == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert (low, high) == pytest.approx((reference.low, reference.high), rel=1e-9)
    se = (statistics.variance(a) / 3 + statistics.variance(b) / 3) ** 0.5
    assert high - low > 1.9 * 2 * 1.96 * se  # t at 2.2 dof is 3.9: twice the normal quantile
    assert welch_difference(a, [15.0]) is None and welch_difference([1.0], b) is None
    assert welch_difference([2.0, 2.0], [1.0, 1.0]) == (1.0, 1.0, 1.0)  # no spread: a point
