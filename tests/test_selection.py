"""Greedy selection within a parameter budget, and the per-round budget."""

from __future__ import annotations

import math

import pytest
import torch

from bonsai_prune.selection import round_budget, select_units

INF = math.inf


def select(score, costs, budget, modules, min_keep, current_keep=None):
    return select_units(
        torch.tensor(score, dtype=torch.float64),
        torch.tensor(costs, dtype=torch.float64),
        budget,
        torch.tensor(modules),
        torch.tensor(min_keep),
        None if current_keep is None else torch.tensor(current_keep),
    )


def test_removes_the_least_important_within_budget():
    selection = select([0.5, 0.1, 0.9, 0.3, 0.7], [1] * 5, 3, [0] * 5, [1])
    assert selection.keep.tolist() == [False, False, True, False, True]
    assert selection.removed_params == 3.0


def test_skips_a_unit_that_does_not_fit_and_goes_on():
    # unit 0 (cost 5) is least important but does not fit in 4; the next two do
    selection = select([0.0, 1.0, 2.0, 3.0], [5, 2, 2, 2], 4, [0] * 4, [0])
    assert selection.keep.tolist() == [True, False, False, True]
    assert selection.removed_params == 4.0


def test_never_exceeds_the_budget():
    generator = torch.Generator().manual_seed(0)
    score = torch.rand(300, generator=generator, dtype=torch.float64)
    costs = torch.randint(1, 50, (300,), generator=generator).double()
    modules = torch.arange(300) % 7
    for budget in (0.0, 13.0, 500.0, 2500.0):
        selection = select_units(score, costs, budget, modules, torch.ones(7, dtype=torch.long))
        removed = float(costs[~selection.keep].sum())
        assert removed == selection.removed_params <= budget


def test_module_floors_are_respected():
    score, costs, modules = [0.0, 0.1, 0.2, 0.3, 0.4], [1] * 5, [0, 0, 0, 1, 1]
    floored = select(score, costs, 100, modules, [1, 1])
    assert floored.keep.tolist() == [False, False, True, False, True]
    emptied = select(score, costs, 100, modules, [0, 2])
    assert emptied.keep.tolist() == [False, False, False, True, True]


def test_infinite_scores_are_never_removed_and_minus_infinity_goes_first():
    selection = select([INF, -INF, 0.0, INF], [1] * 4, 100, [0] * 4, [0])
    assert selection.keep.tolist() == [True, False, False, True]
    first = select([0.0, -INF, 1.0], [1] * 3, 1, [0] * 3, [0])
    assert first.keep.tolist() == [True, False, True]


def test_ties_go_to_the_lower_index():
    selection = select([1.0, 1.0, 1.0, 1.0], [1] * 4, 2, [0] * 4, [0])
    assert selection.keep.tolist() == [False, False, True, True]


def test_already_removed_units_stay_removed_and_cost_nothing():
    current = [False, True, True, True]
    selection = select([0.0, 0.1, 0.2, 0.3], [10, 1, 1, 1], 1, [0] * 4, [2], current)
    assert selection.keep.tolist() == [False, False, True, True]
    assert selection.removed_params == 1.0
    # the floor counts kept units only: one more removal would leave 1 < 2
    floored = select([0.0, 0.1, 0.2, 0.3], [10, 1, 1, 1], 5, [0] * 4, [2], current)
    assert floored.keep.tolist() == [False, False, True, True]


def test_matches_a_plain_greedy_walk():
    # the early stop is only an optimisation: same result as walking every unit
    generator = torch.Generator().manual_seed(4)
    score = torch.rand(200, generator=generator, dtype=torch.float64)
    score[torch.randperm(200, generator=generator)[:30]] = INF
    costs = torch.randint(1, 40, (200,), generator=generator).double()
    modules = torch.randint(0, 5, (200,), generator=generator)
    min_keep = torch.tensor([0, 1, 3, 10, 40])
    budget = 1500.0
    keep = [True] * 200
    kept = torch.bincount(modules, minlength=5).tolist()
    left = budget
    for unit in sorted(range(200), key=lambda u: (float(score[u]), u)):
        module = int(modules[unit])
        if math.isinf(score[unit]) or costs[unit] > left or kept[module] <= min_keep[module]:
            continue
        keep[unit], kept[module], left = False, kept[module] - 1, left - float(costs[unit])
    selection = select_units(score, costs, budget, modules, min_keep)
    assert selection.keep.tolist() == keep


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        select([0.0, math.nan], [1, 1], 1, [0, 0], [0])
    with pytest.raises(ValueError, match="min_keep"):
        select([0.0, 1.0], [1, 1], 1, [0, 1], [0])
    with pytest.raises(ValueError, match=r"\(U,\)"):
        select([0.0, 1.0], [1], 1, [0, 0], [0])


def test_round_budget_is_a_fraction_of_the_original():
    assert round_budget(1000, 1000, 0.5, 0.2) == pytest.approx(200.0)
    assert round_budget(1000, 800, 0.5, 0.2) == pytest.approx(200.0)


def test_round_budget_clips_the_last_round():
    assert round_budget(1000, 600, 0.5, 0.2) == pytest.approx(100.0)  # only 100 left to 50%
    assert round_budget(1000, 500, 0.5, 0.2) == 0.0
    assert round_budget(1000, 450, 0.5, 0.2) == 0.0  # already past the target: never negative
