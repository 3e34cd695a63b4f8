"""Greedy selection within a parameter budget, and the per-round budget."""

from __future__ import annotations

import math

import pytest
import torch

from bonsai_prune.core.budget import round_budget
from bonsai_prune.core.selection import Selection, select_units

INF = math.inf


def select(score, costs, budget, modules, min_keep, current_keep=None) -> Selection:
    return select_units(
        torch.tensor(score, dtype=torch.float64),
        torch.tensor(costs, dtype=torch.float64),
        budget,
        torch.tensor(modules),
        torch.tensor(min_keep),
        None if current_keep is None else torch.tensor(current_keep),
    )


def random_problem(seed: int, n_units: int = 300, n_modules: int = 7):
    """(score (U,), costs (U,), module_index (U,)) with some +inf scores and uneven costs."""
    generator = torch.Generator().manual_seed(seed)
    score = torch.randn(n_units, generator=generator, dtype=torch.float64)
    score[torch.randperm(n_units, generator=generator)[: n_units // 10]] = INF
    costs = torch.randint(1, 50, (n_units,), generator=generator).double()
    modules = torch.randint(0, n_modules, (n_units,), generator=generator)
    return score, costs, modules


# --- order ----------------------------------------------------------------------------------


def test_removes_the_least_important_within_budget():
    selection = select([0.5, 0.1, 0.9, 0.3, 0.7], [1] * 5, 3, [0] * 5, [1])
    assert isinstance(selection, Selection)
    assert selection.keep.tolist() == [False, False, True, False, True]
    assert selection.keep.dtype == torch.bool
    assert selection.removed_params == 3.0


def test_equal_costs_remove_a_prefix_of_the_importance_order():
    score, _, modules = random_problem(1)
    costs = torch.full_like(score, 10.0)
    selection = select_units(score, costs, 905.0, modules, torch.zeros(7, dtype=torch.long))
    removed = ~selection.keep
    assert int(removed.sum()) == 90
    finite_kept = selection.keep & torch.isfinite(score)
    assert float(score[removed].max()) <= float(score[finite_kept].min())


def test_skips_a_unit_that_does_not_fit_and_goes_on():
    # unit 0 (cost 5) is least important but does not fit in 4; the next two do
    selection = select([0.0, 1.0, 2.0, 3.0], [5, 2, 2, 2], 4, [0] * 4, [0])
    assert selection.keep.tolist() == [True, False, False, True]
    assert selection.removed_params == 4.0


def test_ties_go_to_the_lower_index():
    selection = select([1.0, 1.0, 1.0, 1.0], [1] * 4, 2, [0] * 4, [0])
    assert selection.keep.tolist() == [False, False, True, True]


def test_infinite_scores_are_never_removed_and_minus_infinity_goes_first():
    selection = select([INF, -INF, 0.0, INF], [1] * 4, 100, [0] * 4, [0])
    assert selection.keep.tolist() == [True, False, False, True]
    first = select([0.0, -INF, 1.0], [1] * 3, 1, [0] * 3, [0])
    assert first.keep.tolist() == [True, False, True]


def test_infinite_scores_survive_any_budget_and_no_floor():
    score, costs, modules = random_problem(2)
    selection = select_units(score, costs, 1e12, modules, torch.zeros(7, dtype=torch.long))
    assert bool(selection.keep[torch.isinf(score)].all())
    assert not bool(selection.keep[torch.isfinite(score)].any())  # everything else went


# --- the budget -----------------------------------------------------------------------------


def test_never_exceeds_the_budget():
    for seed in range(3):
        score, costs, modules = random_problem(seed)
        for budget in (0.0, 13.0, 500.0, 2500.0):
            selection = select_units(score, costs, budget, modules, torch.ones(7, dtype=torch.long))
            removed = float(costs[~selection.keep].sum())
            assert removed == selection.removed_params <= budget


def test_the_budget_is_nearly_used():
    # greedy with skipping: every finite unit still kept, in a module above its floor, costs
    # more than what is left of the budget (else the walk would have taken it)
    min_keep = torch.tensor([0, 1, 3, 10, 40, 1, 1])
    for seed in range(3):
        score, costs, modules = random_problem(seed)
        for budget in (13.0, 500.0, 2500.0):
            selection = select_units(score, costs, budget, modules, min_keep)
            left = budget - selection.removed_params
            kept = torch.bincount(modules[selection.keep], minlength=7)  # (M,)
            above_floor = (kept > min_keep)[modules]  # (U,)
            could_go = selection.keep & torch.isfinite(score) & above_floor
            assert bool((costs[could_go] > left).all()), (seed, budget)
            assert left < float(costs.max())


def test_unit_costs_use_the_budget_almost_exactly():
    score = torch.randn(200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    costs = torch.full((200,), 7.0, dtype=torch.float64)
    modules = torch.arange(200) % 4
    for budget in (6.0, 7.0, 100.0, 701.0):
        selection = select_units(score, costs, budget, modules, torch.ones(4, dtype=torch.long))
        assert budget - 7.0 < selection.removed_params <= budget


def test_zero_or_negative_budget_removes_nothing():
    for budget in (0.0, -5.0):
        selection = select([0.0, 1.0, 2.0], [1, 1, 1], budget, [0] * 3, [0])
        assert selection.keep.tolist() == [True] * 3
        assert selection.removed_params == 0.0


def test_zero_cost_units_go_whatever_the_budget():
    selection = select([0.0, 1.0, 2.0, 3.0], [0, 5, 0, 5], 0, [0] * 4, [0])
    assert selection.keep.tolist() == [False, True, False, True]
    assert selection.removed_params == 0.0


# --- module floors --------------------------------------------------------------------------


def test_module_floors_are_respected():
    score, costs, modules = [0.0, 0.1, 0.2, 0.3, 0.4], [1] * 5, [0, 0, 0, 1, 1]
    floored = select(score, costs, 100, modules, [1, 1])
    assert floored.keep.tolist() == [False, False, True, False, True]
    emptied = select(score, costs, 100, modules, [0, 2])
    assert emptied.keep.tolist() == [False, False, False, True, True]


def test_floors_hold_on_random_problems():
    min_keep = torch.tensor([0, 1, 3, 10, 40, 1, 1])
    for seed in range(3):
        score, costs, modules = random_problem(seed)
        selection = select_units(score, costs, 1e9, modules, min_keep)
        before = torch.bincount(modules, minlength=7)  # (M,)
        after = torch.bincount(modules[selection.keep], minlength=7)  # (M,)
        assert bool((after >= torch.minimum(min_keep, before)).all())
        # with an unlimited budget the floors (or the +inf units) are what stops removal
        n_inf = torch.bincount(modules[torch.isinf(score)], minlength=7)  # (M,)
        assert after.tolist() == torch.maximum(torch.minimum(min_keep, before), n_inf).tolist()


def test_a_module_below_its_floor_loses_nothing():
    selection = select([0.0, 1.0, 2.0, 3.0], [1] * 4, 100, [0, 0, 1, 1], [3, 0])
    assert selection.keep.tolist() == [True, True, False, False]


def test_a_floored_module_lets_the_walk_go_on_to_other_modules():
    # module 0 holds the least important units but may lose only one
    selection = select([0.0, 0.1, 0.2, 5.0, 6.0], [1] * 5, 3, [0, 0, 0, 1, 1], [2, 0])
    assert selection.keep.tolist() == [False, True, True, False, False]


def test_already_removed_units_stay_removed_and_cost_nothing():
    current = [False, True, True, True]
    selection = select([0.0, 0.1, 0.2, 0.3], [10, 1, 1, 1], 1, [0] * 4, [2], current)
    assert selection.keep.tolist() == [False, False, True, True]
    assert selection.removed_params == 1.0
    # the floor counts kept units only: one more removal would leave 1 < 2
    floored = select([0.0, 0.1, 0.2, 0.3], [10, 1, 1, 1], 5, [0] * 4, [2], current)
    assert floored.keep.tolist() == [False, False, True, True]


def test_inputs_are_not_modified():
    score, costs, modules = random_problem(0)
    current = torch.ones(300, dtype=torch.bool)
    copies = score.clone(), costs.clone(), modules.clone(), current.clone()
    select_units(score, costs, 500.0, modules, torch.ones(7, dtype=torch.long), current)
    for tensor, copy in zip((score, costs, modules, current), copies, strict=True):
        assert torch.equal(tensor, copy)


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


def test_no_units():
    empty = torch.zeros(0, dtype=torch.float64)
    selection = select_units(
        empty, empty, 10.0, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    assert selection.keep.shape == (0,) and selection.removed_params == 0.0


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        select([0.0, math.nan], [1, 1], 1, [0, 0], [0])
    with pytest.raises(ValueError, match="min_keep"):
        select([0.0, 1.0], [1, 1], 1, [0, 1], [0])
    with pytest.raises(ValueError, match=r"\(U,\)"):
        select([0.0, 1.0], [1], 1, [0, 0], [0])
    with pytest.raises(ValueError, match=">= 0"):
        select([0.0, 1.0], [1, -1], 1, [0, 0], [0])


@pytest.mark.parametrize(("budget", "costs"), [(math.nan, [1, 1, 1]), (1.0, [math.nan, 1, 1])])
def test_nan_budget_or_cost_is_rejected(budget: float, costs: list[float]):
    with pytest.raises(ValueError):
        select([0.0, 1.0, 2.0], costs, budget, [0] * 3, [0])


# --- the round's budget ---------------------------------------------------------------------


def test_round_budget_is_a_fraction_of_the_original():
    assert round_budget(1000, 1000, 0.5, 0.2) == pytest.approx(200.0)
    assert round_budget(1000, 800, 0.5, 0.2) == pytest.approx(200.0)
    assert round_budget(1000, 700, 0.5, 0.2) == pytest.approx(200.0)


def test_round_budget_clips_the_last_round():
    assert round_budget(100, 60, 0.5, 0.2) == pytest.approx(10.0)
    assert round_budget(1000, 600, 0.5, 0.2) == pytest.approx(100.0)  # only 100 left to 50%
    assert round_budget(1000, 500, 0.5, 0.2) == 0.0


def test_round_budget_is_never_negative():
    assert round_budget(1000, 450, 0.5, 0.2) == 0.0  # already past the target
    assert round_budget(100, 10, 0.5, 0.2) == 0.0
    assert round_budget(100, 100, 0.0, 0.2) == 0.0
    for current in range(0, 101, 5):
        for target in (0.0, 0.3, 0.5, 0.9):
            assert round_budget(100, current, target, 0.2) >= 0.0


@pytest.mark.parametrize(("target", "fraction", "rounds"), [(0.5, 0.2, 3), (0.5, 0.1, 5)])
def test_round_budgets_reach_the_target_exactly(target: float, fraction: float, rounds: int):
    n_original = current = 10_000
    budgets = []
    while (budget := round_budget(n_original, current, target, fraction)) > 0:
        budgets.append(budget)
        current -= budget
        assert len(budgets) <= 10
    assert len(budgets) == rounds
    assert current == pytest.approx((1 - target) * n_original)
    assert all(b <= fraction * n_original + 1e-9 for b in budgets)


# ---- shared costs: a K/V head is freed with its group's last query head ----------------------


def test_shared_group_cost_is_charged_to_the_last_unit_of_the_group():
    from bonsai_prune.core.selection import SharedCosts

    score = torch.tensor([0.0, 1.0, 2.0, 3.0])  # units 0, 1 share group 0; 2, 3 share group 1
    own = torch.full((4,), 10.0)
    shared = SharedCosts(torch.tensor([0, 0, 1, 1]), torch.tensor([100.0, 100.0]))
    module = torch.zeros(4, dtype=torch.long)
    one = select_units(score, own, 15.0, module, torch.tensor([0]), shared=shared)
    assert one.keep.tolist() == [False, True, True, True] and one.removed_params == 10.0
    # unit 1 would free its group (10 + 100) but only 25 is left: skipped; unit 2 still fits
    two = select_units(score, own, 35.0, module, torch.tensor([0]), shared=shared)
    assert two.keep.tolist() == [False, True, False, True] and two.removed_params == 20.0
    whole = select_units(score, own, 120.0, module, torch.tensor([0]), shared=shared)
    assert whole.keep.tolist() == [False, False, True, True] and whole.removed_params == 120.0


# Any selection on a real adapter frees exactly removed_params: the adapter contract table
# (tests/test_adapter_contract.py) checks it for every family.


@pytest.mark.parametrize(
    ("sparsity", "fraction", "done", "left"),
    [(0.5, 0.05, 0.0, 10), (0.5, 0.05, 0.25, 5), (0.3, 0.1, 0.0, 3), (0.3, 0.1, 0.296, 0), (0.35, 0.1, 0.0, 4)],
)  # fmt: skip
def test_rounds_left_counts_whole_rounds_to_the_target(sparsity, fraction, done, left):
    from bonsai_prune.config import PruneConfig
    from bonsai_prune.core.budget import rounds_left

    config = PruneConfig(sparsity=sparsity, prune_fraction=fraction)
    assert rounds_left(round(1000 * (1 - done)), 1000, config) == left


# ---- blocks: a module's width stays a multiple of N (--mlp-multiple) --------------------------


def test_a_block_goes_at_its_members_mean_importance():
    # module 0 (multiple 2): blocks {0.0, 0.2} (mean 0.1) and {0.9, 1.0}; module 1: one unit
    score = torch.tensor([0.9, 0.0, 1.0, 0.2, 0.15], dtype=torch.float64)
    costs, modules = torch.ones(5), torch.tensor([0, 0, 0, 0, 1])
    floors, multiple = torch.tensor([0, 0]), torch.tensor([2, 1])
    two = select_units(score, costs, 2.0, modules, floors, multiple=multiple)
    assert two.keep.tolist() == [True, False, True, False, True] and two.removed_params == 2.0
    # the block costs 2 and does not fit in 1: the walk goes on to the single unit
    one = select_units(score, costs, 1.0, modules, floors, multiple=multiple)
    assert one.keep.tolist() == [True, True, True, True, False] and one.removed_params == 1.0


def test_the_first_block_brings_an_uneven_width_to_a_multiple():
    score = torch.arange(7, dtype=torch.float64)  # one module of 7 units, multiple 3
    selection = select_units(
        score, torch.ones(7), 1.0, torch.zeros(7, dtype=torch.long), torch.tensor([1]),
        multiple=torch.tensor([3]),
    )  # fmt: skip
    assert selection.keep.tolist() == [False] + [True] * 6  # 7 mod 3 = 1 unit, leaving 6


@pytest.mark.parametrize("seed", range(6))
def test_blocks_keep_widths_multiples_within_budget_and_floors(seed: int):
    score, costs, modules = random_problem(seed)
    costs = torch.full_like(costs, 3.0)  # a module's units cost the same, as neurons do
    multiple = torch.tensor([1, 4, 8, 3, 1, 5, 2])
    floors = torch.tensor([0, 1, 0, 2, 1, 0, 9])
    generator = torch.Generator().manual_seed(100 + seed)
    current = torch.rand(300, generator=generator) > 0.1
    budget = 400.0
    selection = select_units(score, costs, budget, modules, floors, current, multiple=multiple)
    keep = selection.keep
    assert not bool((keep & ~current).any())  # removed units stay removed
    assert bool(keep[torch.isinf(score) & current].all())  # fixed units stay
    newly_removed = current & ~keep
    assert selection.removed_params == pytest.approx(float(costs[newly_removed].sum()))
    assert selection.removed_params <= budget
    assert selection.removed_params > budget - 3.0 * 8  # short of it by under one block
    for module, n in enumerate(multiple.tolist()):
        before = int(current[modules == module].sum())
        after = int(keep[modules == module].sum())
        assert after >= min(before, int(floors[module]))
        assert after == before or after % n == 0, (module, before, after, n)
        # the least important go first within a module
        gone, stay = newly_removed & (modules == module), keep & (modules == module)
        if bool(gone.any()) and bool((stay & torch.isfinite(score)).any()):
            assert float(score[gone].max()) <= float(score[stay & torch.isfinite(score)].min())


def test_multiple_one_everywhere_is_the_unit_walk():
    score, costs, modules = random_problem(3)
    floors = torch.ones(7, dtype=torch.long)
    plain = select_units(score, costs, 900.0, modules, floors)
    ones = select_units(
        score, costs, 900.0, modules, floors, multiple=torch.ones(7, dtype=torch.long)
    )
    assert torch.equal(plain.keep, ones.keep) and plain.removed_params == ones.removed_params


@pytest.mark.parametrize("multiple", [1, 4])
def test_at_least_one_removes_the_least_important_unit_or_block_when_nothing_fits(multiple):
    score = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4], dtype=torch.float64)
    costs, modules, floors = (
        torch.full((8,), 10.0),
        torch.zeros(8, dtype=torch.long),
        torch.tensor([1]),
    )
    none = select_units(score, costs, 5.0, modules, floors, multiple=torch.tensor([multiple]))
    assert bool(none.keep.all()) and none.removed_params == 0.0
    forced = select_units(
        score, costs, 5.0, modules, floors, multiple=torch.tensor([multiple]), at_least_one=True
    )
    expected = score > (0.1 if multiple == 1 else 0.4)  # the lowest unit, or the lowest 4
    assert forced.keep.tolist() == expected.tolist()
    assert forced.removed_params == 10.0 * multiple


def test_a_shared_group_must_not_be_blocked():
    from bonsai_prune.core.selection import SharedCosts

    shared = SharedCosts(torch.tensor([0, 0, -1, -1]), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="shared group"):
        select_units(
            torch.arange(4.0), torch.ones(4), 2.0, torch.zeros(4, dtype=torch.long),
            torch.tensor([0]), shared=shared, multiple=torch.tensor([2]),
        )  # fmt: skip


@pytest.mark.parametrize("multiple", [[2], [2, 0], [2, 2, 2]])
def test_a_multiple_per_module_of_at_least_one_is_required(multiple):
    with pytest.raises(ValueError, match="multiple must be"):
        select_units(
            torch.arange(4.0), torch.ones(4), 2.0, torch.tensor([0, 0, 1, 1]),
            torch.tensor([0, 0]), multiple=torch.tensor(multiple),
        )  # fmt: skip
