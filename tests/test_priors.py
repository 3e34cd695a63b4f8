"""Priors and the fixed set: pure tensors, no model."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch

from bonsai_prune.core.priors import (
    PRIORS,
    UnitStats,
    fixed_count,
    fixed_units,
    round_half_up,
    units_to_remove,
)
from bonsai_prune.errors import ConfigError


def make_stats(n_units: int = 12) -> UnitStats:
    """wanda rises with the index, weight_norm falls: the two priors disagree on purpose."""
    wanda = torch.arange(n_units, dtype=torch.float32)
    return UnitStats(wanda=wanda, weight_norm=wanda.flip(0) * 2)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_removals(n_units: int, fraction: float) -> int:
    """round(f * n), half up, in exact decimal arithmetic (no float error at x.5)."""
    return math.floor(Fraction(str(fraction)) * n_units + Fraction(1, 2))


# --- the registry and each prior ---------------------------------------------------------


def test_registry_lists_the_four_priors():
    assert PRIORS.names() == ["magnitude", "random", "uniform", "wanda"]
    for name in PRIORS.names():
        assert name in PRIORS
    with pytest.raises(ConfigError, match="magnitude, random, uniform, wanda"):
        PRIORS.get("fisher")


@pytest.mark.parametrize("name", ["wanda", "magnitude", "random", "uniform"])
@pytest.mark.parametrize("n_units", [0, 1, 37])
def test_every_prior_returns_a_finite_float64_vector_over_the_units(name: str, n_units: int):
    prior = PRIORS.get(name)(make_stats(n_units), gen(0))
    assert prior.shape == (n_units,)
    assert prior.dtype == torch.float64
    assert bool(torch.isfinite(prior).all())


def test_statistic_priors_return_their_statistic():
    stats = make_stats()
    wanda = PRIORS.get("wanda")(stats, gen(0))
    magnitude = PRIORS.get("magnitude")(stats, gen(0))
    assert torch.equal(wanda, torch.arange(12, dtype=torch.float64))
    assert torch.equal(magnitude, 2 * torch.arange(11, -1, -1, dtype=torch.float64))


def test_statistic_priors_ignore_and_do_not_consume_the_generator():
    stats = make_stats()
    generator = gen(5)
    for name in ("wanda", "magnitude", "uniform"):
        first = PRIORS.get(name)(stats, generator)
        assert torch.equal(first, PRIORS.get(name)(stats, gen(123)))
    # the generator is untouched: it still draws what a fresh one with seed 5 draws
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=gen(5)))


def test_statistic_priors_do_not_alias_the_statistics():
    stats = make_stats()
    prior = PRIORS.get("wanda")(stats, gen(0))
    prior[0] = 100.0
    assert float(stats.wanda[0]) == 0.0


def test_uniform_prior_is_all_equal():
    prior = PRIORS.get("uniform")(make_stats(7), gen(0))
    assert torch.equal(prior, torch.ones(7, dtype=torch.float64))


def test_random_prior_follows_the_generator():
    stats = make_stats(50)
    random_prior = PRIORS.get("random")
    first = random_prior(stats, gen(1))
    again = random_prior(stats, gen(1))
    other = random_prior(stats, gen(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert bool(((first >= 0) & (first < 1)).all())
    assert len(set(first.tolist())) == 50  # no ties: the fixed set is not decided by index


def test_random_prior_ignores_the_global_seed():
    torch.manual_seed(0)
    first = PRIORS.get("random")(make_stats(20), gen(3))
    torch.manual_seed(1)
    assert torch.equal(first, PRIORS.get("random")(make_stats(20), gen(3)))


def test_random_prior_draws_fresh_values_from_an_advancing_generator():
    generator = gen(4)
    first = PRIORS.get("random")(make_stats(20), generator)
    second = PRIORS.get("random")(make_stats(20), generator)
    assert not torch.equal(first, second)


def test_unit_stats_are_frozen():
    stats = make_stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.wanda = torch.zeros(12)  # type: ignore[misc]


# --- counts -------------------------------------------------------------------------------


def test_round_half_up_rounds_halves_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49, 0.0, 3.0)] == [1, 2, 3, 2, 0, 3]


@pytest.mark.parametrize(
    ("n_units", "fraction", "k"),
    [(10, 0.2, 2), (9, 0.2, 2), (5, 0.1, 1), (25, 0.1, 3), (1536, 0.2, 307), (9, 0.05, 0)],
)
def test_units_to_remove_is_round_half_up_of_f_n(n_units: int, fraction: float, k: int):
    assert units_to_remove(n_units, fraction) == k


@pytest.mark.parametrize(
    ("n_units", "fraction", "n_fixed"),
    [(10, 0.2, 6), (30, 0.1, 24), (1536, 0.2, 922), (9, 0.2, 5), (9, 0.1, 7), (4, 0.5, 0)],
)
def test_fixed_count_per_module(n_units: int, fraction: float, n_fixed: int):
    # ceil((1 - 2f) n), lowered where needed to leave 2 * round(f n) candidates
    assert fixed_count(n_units, fraction) == n_fixed
    prior = torch.rand(n_units, generator=gen(0))
    fixed = fixed_units(prior, torch.zeros(n_units, dtype=torch.long), fraction)
    assert int(fixed.sum()) == n_fixed


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.45, 0.5, 0.7])
def test_fixed_count_leaves_enough_candidates_for_any_module_size(fraction: float):
    for n_units in range(1, 300):
        n_fixed = fixed_count(n_units, fraction)
        k = exact_removals(n_units, fraction)
        assert 0 <= n_fixed <= max(0, math.ceil((1 - 2 * Fraction(str(fraction))) * n_units))
        assert n_units - n_fixed >= min(n_units, 2 * k), (n_units, fraction)
        # and no more than needed: both masks of a pair remove exactly k
        if 2 * k <= n_units:
            assert n_units - n_fixed == 2 * k, (n_units, fraction)


def test_units_to_remove_is_exact_at_decimal_halves():
    assert units_to_remove(90, 0.35) == exact_removals(90, 0.35) == 32
    assert fixed_count(90, 0.35) == 90 - 2 * 32


# --- the fixed set ------------------------------------------------------------------------


def test_fixed_units_are_the_top_of_each_module():
    # two interleaved modules of 10: the top 6 of each by prior are fixed
    prior = torch.rand(20, generator=gen(3), dtype=torch.float64)
    module_index = torch.arange(20) % 2
    fixed = fixed_units(prior, module_index, 0.2)
    assert fixed.shape == (20,) and fixed.dtype == torch.bool
    for module in (0, 1):
        in_module = module_index == module
        assert int(fixed[in_module].sum()) == 6
        assert prior[in_module & fixed].min() > prior[in_module & ~fixed].max()


def test_fixed_units_is_per_module_not_global():
    # module 1 is all low-prior, yet keeps its own top units fixed
    prior = torch.cat([torch.arange(10.0) + 100, torch.arange(10.0)])
    module_index = torch.tensor([0] * 10 + [1] * 10)
    fixed = fixed_units(prior, module_index, 0.2)
    assert fixed.tolist() == ([False] * 4 + [True] * 6) * 2


def test_fixed_units_on_random_layouts():
    generator = gen(11)
    for _ in range(20):
        n_modules = int(torch.randint(1, 6, (1,), generator=generator))
        sizes = torch.randint(1, 60, (n_modules,), generator=generator).tolist()
        fraction = float(torch.rand(1, generator=generator)) * 0.6
        module_index = torch.cat([torch.full((n,), m) for m, n in enumerate(sizes)])
        module_index = module_index[torch.randperm(len(module_index), generator=generator)]
        prior = torch.randn(len(module_index), generator=generator, dtype=torch.float64)
        fixed = fixed_units(prior, module_index, fraction)
        for module, n in enumerate(sizes):
            in_module = module_index == module
            n_fixed = int(fixed[in_module].sum())
            assert n_fixed == fixed_count(n, fraction)
            assert n - n_fixed >= min(n, 2 * units_to_remove(n, fraction))
            if 0 < n_fixed < n:
                assert prior[in_module & fixed].min() > prior[in_module & ~fixed].max()


def test_fixed_ties_go_to_the_lower_index():
    fixed = fixed_units(torch.ones(10), torch.zeros(10, dtype=torch.long), 0.2)
    assert fixed.tolist() == [True] * 6 + [False] * 4


def test_fixed_ties_within_interleaved_modules_go_to_the_lower_index():
    prior = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0])
    module_index = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    # each module of 5 fixes ceil(0.6 * 5) = 3, lowered to 5 - 2 * round(1.0) = 3
    fixed = fixed_units(prior, module_index, 0.2)
    # module 0: units 0, 2, 4, 6, 8 with priors 1, 1, 1, 2, 0 -> 6, then 0 and 2 by index
    assert fixed[0::2].tolist() == [True, True, False, True, False]
    assert fixed[1::2].tolist() == [True, True, False, True, False]
    assert torch.equal(fixed, fixed_units(prior.clone(), module_index.clone(), 0.2))


def test_fixed_set_depends_only_on_the_order_of_the_prior():
    prior = torch.randn(30, generator=gen(2), dtype=torch.float64)
    module_index = torch.arange(30) % 3
    fixed = fixed_units(prior, module_index, 0.2)
    assert torch.equal(fixed, fixed_units(prior.exp() * 1e-6, module_index, 0.2))
    assert torch.equal(fixed, fixed_units(prior.float() * 1e6 + 3, module_index, 0.2))


def test_zero_fraction_fixes_everything_and_half_fixes_nothing():
    prior = torch.rand(8, generator=gen(0))
    module_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert bool(fixed_units(prior, module_index, 0.0).all())
    assert not bool(fixed_units(prior, module_index, 0.5).any())
    assert not bool(fixed_units(prior, module_index, 1.0).any())


def test_fixed_units_handles_empty_and_missing_modules():
    assert fixed_units(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.2).shape == (0,)
    # module 1 has no units: modules 0 and 2 are handled as usual
    module_index = torch.tensor([0] * 10 + [2] * 10)
    fixed = fixed_units(torch.arange(20.0), module_index, 0.2)
    assert fixed.tolist() == ([False] * 4 + [True] * 6) * 2


def test_fixed_units_rejects_bad_input():
    with pytest.raises(ValueError, match="sample_fraction"):
        fixed_units(torch.ones(3), torch.zeros(3, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="sample_fraction"):
        fixed_units(torch.ones(3), torch.zeros(3, dtype=torch.long), -0.1)
    with pytest.raises(ValueError, match="alike"):
        fixed_units(torch.ones(3), torch.zeros(4, dtype=torch.long), 0.2)
    with pytest.raises(ValueError, match="alike"):
        fixed_units(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fixed_units_rejects_a_non_finite_prior(bad: float):
    prior = torch.arange(6, dtype=torch.float64)
    prior[2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        fixed_units(prior, torch.zeros(6, dtype=torch.long), 0.2)
