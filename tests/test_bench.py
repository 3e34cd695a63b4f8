"""The bench's pure parts: ratios measured round by round, and when a spread is too wide."""

from __future__ import annotations

import pytest

from bonsai_prune.bench import MAX_RATIO_SPREAD, _ratio_text, ratio_over_rounds


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
