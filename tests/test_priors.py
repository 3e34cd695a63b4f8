"""Priors and the fixed set: pure tensors, no model."""

from __future__ import annotations

import math

import pytest
import torch

from bonsai_prune.errors import ConfigError
from bonsai_prune.priors import PRIORS, UnitStats, fixed_units


def make_stats(n_units: int = 12) -> UnitStats:
    wanda = torch.arange(n_units, dtype=torch.float32)
    return UnitStats(wanda=wanda, weight_norm=wanda.flip(0) * 2)


def test_registry_lists_the_four_priors():
    assert PRIORS.names() == ["magnitude", "random", "uniform", "wanda"]
    with pytest.raises(ConfigError, match="magnitude, random, uniform, wanda"):
        PRIORS.get("fisher")


def test_statistic_priors_return_their_statistic_as_float64():
    stats = make_stats()
    generator = torch.Generator().manual_seed(0)
    wanda = PRIORS.get("wanda")(stats, generator)
    magnitude = PRIORS.get("magnitude")(stats, generator)
    assert wanda.dtype == magnitude.dtype == torch.float64
    assert torch.equal(wanda, stats.wanda.double())
    assert torch.equal(magnitude, stats.weight_norm.double())


def test_uniform_prior_is_all_ones():
    prior = PRIORS.get("uniform")(make_stats(7), torch.Generator().manual_seed(0))
    assert prior.shape == (7,)
    assert torch.equal(prior, torch.ones(7, dtype=torch.float64))


def test_random_prior_follows_the_generator():
    stats = make_stats(50)
    random_prior = PRIORS.get("random")
    first = random_prior(stats, torch.Generator().manual_seed(1))
    again = random_prior(stats, torch.Generator().manual_seed(1))
    other = random_prior(stats, torch.Generator().manual_seed(2))
    assert first.shape == (50,) and first.dtype == torch.float64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert bool(((first >= 0) & (first < 1)).all())


@pytest.mark.parametrize(
    ("n_units", "fraction", "n_fixed"),
    [(10, 0.2, 6), (30, 0.1, 24), (1536, 0.2, 922), (9, 0.2, 5), (9, 0.1, 7), (4, 0.5, 0)],
)
def test_fixed_count_per_module(n_units: int, fraction: float, n_fixed: int):
    # ceil((1 - 2f) n), lowered where needed to leave 2 * round(f n) candidates
    prior = torch.rand(n_units, generator=torch.Generator().manual_seed(0))
    fixed = fixed_units(prior, torch.zeros(n_units, dtype=torch.long), fraction)
    assert int(fixed.sum()) == n_fixed
    n_candidates = n_units - n_fixed
    assert n_candidates >= min(n_units, 2 * math.floor(fraction * n_units + 0.5))


def test_fixed_units_are_the_top_of_each_module():
    # two interleaved modules of 10: the top 6 of each by prior are fixed
    prior = torch.rand(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    module_index = torch.arange(20) % 2
    fixed = fixed_units(prior, module_index, 0.2)
    for module in (0, 1):
        in_module = module_index == module
        assert int(fixed[in_module].sum()) == 6
        lowest_fixed = prior[in_module & fixed].min()
        highest_candidate = prior[in_module & ~fixed].max()
        assert lowest_fixed > highest_candidate


def test_fixed_ties_go_to_the_lower_index():
    prior = torch.ones(10)
    fixed = fixed_units(prior, torch.zeros(10, dtype=torch.long), 0.2)
    assert fixed.tolist() == [True] * 6 + [False] * 4


def test_zero_fraction_fixes_everything_and_half_fixes_nothing():
    prior = torch.rand(8, generator=torch.Generator().manual_seed(0))
    module_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert bool(fixed_units(prior, module_index, 0.0).all())
    assert not bool(fixed_units(prior, module_index, 0.5).any())


def test_fixed_units_rejects_bad_input():
    with pytest.raises(ValueError, match="prune_fraction"):
        fixed_units(torch.ones(3), torch.zeros(3, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="alike"):
        fixed_units(torch.ones(3), torch.zeros(4, dtype=torch.long), 0.2)
