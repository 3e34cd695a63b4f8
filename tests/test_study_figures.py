"""The study's per-problem figures: pure functions over evaluation records."""

from __future__ import annotations

import pytest

from bonsai_prune.study.figures import repeat_figures


def _row(index: int, prediction: str, strict: float, u: float, nll: float | None) -> dict:
    return {
        "index": index,
        "prediction": prediction,
        "accuracy_strict": strict,
        "u_dagger": u,
        "reference_nll": nll,
    }


def test_repeat_figures_compares_only_the_shared_problems():
    """Problems match by index, not position; the figures are means over the shared ones
    in each evaluation; a missing NLL is left out of the gap and the mean, not counted 0."""
    first = [_row(0, "a", 1.0, 30.0, 1.0), _row(1, "b", 0.0, 20.0, 2.0)]
    again = [
        _row(1, "b", 0.0, 22.0, 2.5),  # same text, another NLL
        _row(0, "c", 0.0, 10.0, None),
        _row(7, "z", 1.0, 90.0, 0.1),  # only in the whole split
    ]
    r = repeat_figures(first, again)
    assert r["rows"] == 2 and r["same_prediction"] == 1
    assert r["max_reference_nll_gap"] == pytest.approx(0.5)
    assert r["accuracy_strict"] == pytest.approx([0.5, 0.0])
    assert r["u_dagger"] == pytest.approx([25.0, 16.0])
    assert r["reference_nll"] == pytest.approx([2.0, 2.5])


def test_repeat_figures_of_disjoint_evaluations_has_nothing_to_say():
    r = repeat_figures([_row(0, "a", 1.0, 1.0, 1.0)], [_row(1, "a", 1.0, 1.0, 1.0)])
    assert r["rows"] == 0 and r["max_reference_nll_gap"] is None and r["u_dagger"] is None
