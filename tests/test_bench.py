"""The bench's pure parts: ratios measured round by round, and when a spread is too wide."""

from __future__ import annotations

import pytest

from bonsai_prune.bench import MAX_RATIO_SPREAD, _ratio_text, project_search, ratio_over_rounds


def rounds(values: list[float]) -> list[dict]:
    return [{"decode_tokens_per_s": v} for v in values]


def test_ratios_are_taken_within_each_round_then_summarised():
    # the machine slowed down in round 2 for both sides: the per-round ratio is unaffected
    summary = ratio_over_rounds(
        rounds([120, 60, 118]), rounds([100, 50, 100]), "decode_tokens_per_s"
    )
    assert summary["median"] == pytest.approx(1.2)
    assert (summary["min"], summary["max"]) == (pytest.approx(1.18), pytest.approx(1.2))
    assert summary["trusted"] and summary["rounds"] == 3


def test_a_burst_of_load_on_one_side_makes_the_ratio_untrusted():
    summary = ratio_over_rounds(
        rounds([120, 15, 118]), rounds([100, 100, 100]), "decode_tokens_per_s"
    )
    assert (summary["max"] - summary["min"]) / summary["median"] > MAX_RATIO_SPREAD
    assert not summary["trusted"]
    assert "not a result" in _ratio_text(summary["median"], summary)
    assert _ratio_text(1.2, None) == "1.20x"


def test_projection_shrinks_the_body_with_each_round_and_bounds_by_flops():
    overhead = {"prior_s": 2.0, "prior_problems": 4, "regression_s": 3.0}
    got = project_search(0.5, 4, body_flops=1e9, head_flops=0.0, peak_flops_per_s=1e10,
                         overhead=overhead)  # fmt: skip
    # 10 rounds of 5%; round r keeps 1 - r/20 of the body: sum 7.75; 8 problems = 2x measured
    assert got["rounds"] == 10 and got["evaluations"] == 2000 and got["projected"]
    assert got["projected_evaluation_s"] == pytest.approx(200 * 0.5 * 2 * 7.75)
    assert got["projected_s"] == pytest.approx(got["projected_evaluation_s"] + 2 * 2 * 7.75 + 30)
    assert got["flops_lower_bound_s"] == pytest.approx(200 * 1e9 * 2 * 7.75 / 1e10)
    # compensation before each slice: measured once, shrinking with the body
    compensated = project_search(0.5, 4, 1e9, 0.0, 1e10, {**overhead, "compensation_s": 4.0})
    assert compensated["projected_s"] == pytest.approx(got["projected_s"] + 4.0 * 7.75)


def test_the_lm_head_does_not_shrink():
    overhead = {"prior_s": 0.0, "prior_problems": 8, "regression_s": 0.0}
    head_only = project_search(1.0, 8, 0.0, 1e9, 1e9, overhead)
    assert head_only["projected_evaluation_s"] == pytest.approx(2000.0)
