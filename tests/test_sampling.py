"""Antithetic keep masks: fractions, fixed units, complements, seeds and sampling weights."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from scipy.stats import spearmanr

from bonsai_prune.core.priors import fixed_units
from bonsai_prune.core.sampling import EPSILON, removal_weights, removals_per_module, sample_masks

# four modules: 9 "heads", 40, 25 and 5 "neurons", interleaved to catch index mix-ups
SIZES = (9, 40, 25, 5)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layout(sizes: tuple[int, ...] = SIZES) -> tuple[torch.Tensor, torch.Tensor]:
    """(prior (U,), module_index (U,)) with the modules' units shuffled together."""
    module_index = torch.cat([torch.full((n,), m) for m, n in enumerate(sizes)])  # (U,)
    module_index = module_index[torch.randperm(len(module_index), generator=gen(99))]
    prior = torch.rand(len(module_index), generator=gen(7), dtype=torch.float64)  # (U,)
    return prior, module_index


def exact_removals(n_units: int, fraction: float) -> int:
    """round(f * n), half up, in exact decimal arithmetic."""
    return math.floor(Fraction(str(fraction)) * n_units + Fraction(1, 2))


def fixed_count_masks(*args, **kwargs) -> torch.Tensor:
    """Bonsai's sampler: every mask removes round(f * n) units of each module."""
    return sample_masks(*args, removal_counts="fixed", **kwargs)


def removal_frequency(masks: torch.Tensor) -> torch.Tensor:
    """(U,) share of the first masks of the pairs that remove each unit."""
    return (~masks[0::2]).double().mean(dim=0)


# --- counts and fixed units ----------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.25, 0.3, 0.45])
def test_every_mask_removes_round_f_n_of_each_module_and_no_fixed_unit(fraction: float):
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, fraction)
    masks = fixed_count_masks(prior, fixed, module_index, fraction, 16, generator=gen(0))
    assert masks.shape == (32, len(prior)) and masks.dtype == torch.bool
    assert bool(masks[:, fixed].all())  # fixed units are never removed
    for module, n in enumerate(SIZES):
        in_module = module_index == module
        removed = (~masks[:, in_module]).sum(dim=1)  # (N,) units each mask removes here
        assert removed.tolist() == [exact_removals(n, fraction)] * 32, (module, n)


def test_half_up_rounding_at_exact_halves():
    # 0.1 * 5 = 0.5 -> 1 and 0.1 * 25 = 2.5 -> 3 (Python's round would give 0 and 2)
    prior, module_index = layout((5, 25))
    fixed = fixed_units(prior, module_index, 0.1)
    masks = fixed_count_masks(prior, fixed, module_index, 0.1, 4, generator=gen(0))
    assert (~masks[:, module_index == 0]).sum(dim=1).tolist() == [1] * 8
    assert (~masks[:, module_index == 1]).sum(dim=1).tolist() == [3] * 8


def test_fixed_units_are_never_removed_even_with_the_lowest_prior():
    # the fixed units here would be the likeliest removals if they were candidates
    prior = torch.arange(30, dtype=torch.float64)
    module_index = torch.arange(30) % 2
    fixed = prior < 12
    masks = fixed_count_masks(prior, fixed, module_index, 0.2, 200, generator=gen(1))
    assert bool(masks[:, fixed].all())
    assert (~masks[0::2]).sum(dim=1).tolist() == [2 * 3] * 200  # 3 of each module of 15


def test_fixed_units_may_carry_an_infinite_prior():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    prior = prior.clone()
    prior[fixed] = math.inf
    masks = sample_masks(prior, fixed, module_index, 0.2, 4, generator=gen(0))
    assert bool(masks[:, fixed].all()) and not bool(masks.all())


def test_above_half_the_partner_removes_the_rest_of_the_candidates():
    prior, module_index = layout()
    fixed = torch.zeros(len(prior), dtype=torch.bool)  # what fixed_units gives for f >= 0.5
    masks = fixed_count_masks(prior, fixed, module_index, 0.7, 5, generator=gen(0))
    for module, n in enumerate(SIZES):
        removed = (~masks[:, module_index == module]).sum(dim=1)  # (N,)
        k = exact_removals(n, 0.7)
        assert removed[0::2].tolist() == [k] * 5
        assert removed[1::2].tolist() == [n - k] * 5


def test_removals_per_module():
    assert removals_per_module(10, 4, 0.2) == 2
    assert removals_per_module(10, 1, 0.2) == 1  # capped by the candidates
    assert removals_per_module(9, 2, 0.02) == 1  # at least one when there are candidates
    assert removals_per_module(10, 0, 0.2) == 0
    assert removals_per_module(10, 4, 0.0) == 0


def test_a_module_with_candidates_loses_at_least_one_unit():
    # round(0.02 * 9) = 0, but the module has candidates: they must be perturbed
    prior = torch.arange(9, dtype=torch.float64)
    module_index = torch.zeros(9, dtype=torch.long)
    fixed = torch.tensor([True] * 7 + [False] * 2)
    masks = fixed_count_masks(prior, fixed, module_index, 0.02, 4, generator=gen(0))
    assert (~masks).sum(dim=1).tolist() == [1] * 8


def test_modules_without_candidates_are_untouched():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2) | (module_index == 1)
    masks = sample_masks(prior, fixed, module_index, 0.2, 6, generator=gen(0))
    assert bool(masks[:, module_index == 1].all())
    assert not bool(masks[:, module_index == 2].all())


def test_module_ids_with_gaps():
    # no unit belongs to module 1
    module_index = torch.tensor([0] * 10 + [2] * 10)
    prior = torch.rand(20, generator=gen(0), dtype=torch.float64)
    fixed = fixed_units(prior, module_index, 0.2)
    masks = fixed_count_masks(prior, fixed, module_index, 0.2, 3, generator=gen(0))
    assert (~masks[:, :10]).sum(dim=1).tolist() == [2] * 6
    assert (~masks[:, 10:]).sum(dim=1).tolist() == [2] * 6


# --- antithetic pairs and seeds -------------------------------------------------------------


def test_pair_partners_are_complements_within_the_candidates():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    masks = sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(0))
    first, second = masks[0::2], masks[1::2]  # (P, U) each
    assert torch.equal(first[:, ~fixed], ~second[:, ~fixed])
    assert bool(first[:, fixed].all()) and bool(second[:, fixed].all())
    # each candidate is kept by exactly one mask of every pair
    assert bool((first.int() + second.int())[:, ~fixed].eq(1).all())


def test_pairs_differ_from_one_another():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    masks = sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(0))
    assert len({tuple(row.tolist()) for row in masks[0::2]}) == 8


def test_same_generator_seed_same_masks_other_seed_other_masks():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)

    def draw(seed: int) -> torch.Tensor:
        return sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_the_generator_is_the_only_source_of_randomness():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    torch.manual_seed(0)
    first = sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(4))
    torch.manual_seed(1)
    assert torch.equal(first, sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(4)))
    # a generator that has advanced draws other masks
    generator = gen(4)
    once = sample_masks(prior, fixed, module_index, 0.2, 8, generator=generator)
    twice = sample_masks(prior, fixed, module_index, 0.2, 8, generator=generator)
    assert torch.equal(once, first) and not torch.equal(once, twice)


def test_inputs_are_not_modified():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    copies = prior.clone(), fixed.clone(), module_index.clone()
    sample_masks(prior, fixed, module_index, 0.2, 4, generator=gen(0))
    assert all(torch.equal(a, b) for a, b in zip((prior, fixed, module_index), copies, strict=True))


# --- who gets removed -------------------------------------------------------------------------


def test_low_prior_candidates_are_removed_more_often():
    prior = torch.linspace(0, 1, 40, dtype=torch.float64)
    module_index = torch.zeros(40, dtype=torch.long)
    fixed = torch.zeros(40, dtype=torch.bool)
    masks = sample_masks(prior, fixed, module_index, 0.2, 1000, generator=gen(3))
    frequency = removal_frequency(masks)  # (40,)
    assert spearmanr(prior.numpy(), frequency.numpy()).statistic < -0.95
    quarter = frequency.reshape(4, 10).mean(dim=1)  # lowest prior quarter first
    assert bool((quarter[:-1] > quarter[1:]).all())
    assert float(frequency[:10].min()) > float(frequency[-10:].max())


def test_removal_order_follows_the_prior_not_the_index():
    # a shuffled prior over two interleaved modules with fixed_units' candidates
    prior, module_index = layout((40, 40))
    fixed = fixed_units(prior, module_index, 0.25)
    masks = sample_masks(prior, fixed, module_index, 0.25, 1000, generator=gen(6))
    frequency = removal_frequency(masks)  # (U,)
    for module in (0, 1):
        candidates = (module_index == module) & ~fixed
        rho = spearmanr(prior[candidates].numpy(), frequency[candidates].numpy()).statistic
        assert rho < -0.9


def test_removal_frequency_is_proportional_to_the_gap_from_the_max():
    # one module, k = 1 removal per first mask: P(remove j) = w_j / sum(w) exactly
    prior = torch.arange(10, dtype=torch.float64)
    module_index = torch.zeros(10, dtype=torch.long)
    fixed = torch.zeros(10, dtype=torch.bool)
    n_pairs = 4000
    masks = fixed_count_masks(prior, fixed, module_index, 0.1, n_pairs, generator=gen(0))
    frequency = removal_frequency(masks)  # (10,)
    expected = removal_weights(prior) / removal_weights(prior).sum()
    sigma = (expected * (1 - expected) / n_pairs).sqrt()
    assert bool(((frequency - expected).abs() < 4 * sigma + 1e-9).all())
    assert frequency[-1] < 0.001  # the max-prior unit has only the epsilon floor


def test_the_gap_is_measured_from_the_best_unit_of_the_module_as_bonsai_does():
    # the module's best unit is fixed at 19: candidate j weighs 19 - j, so the best candidate
    # (9) is still drawn, and the top candidates are not all kept together
    prior = torch.cat([torch.arange(10, dtype=torch.float64), torch.full((10,), 19.0)])
    module_index = torch.zeros(20, dtype=torch.long)
    fixed = prior > 10
    masks = fixed_count_masks(prior, fixed, module_index, 0.05, 2000, generator=gen(2))
    frequency = removal_frequency(masks)  # k = 1 of the 10 candidates per first mask
    total = sum(19 - j for j in range(10))  # 145
    assert frequency[9] == pytest.approx(10 / total, abs=0.03)
    assert frequency[0] == pytest.approx(19 / total, abs=0.03)


def test_uniform_prior_samples_candidates_uniformly():
    prior = torch.ones(20, dtype=torch.float64)
    module_index = torch.zeros(20, dtype=torch.long)
    fixed = torch.zeros(20, dtype=torch.bool)
    masks = fixed_count_masks(prior, fixed, module_index, 0.25, 2000, generator=gen(5))
    expected = torch.full((20,), 0.25, dtype=torch.float64)
    assert torch.allclose(removal_frequency(masks), expected, atol=0.04)


def test_removal_weights():
    prior = torch.tensor([3.0, 1.0, 2.0, 3.0, 0.0])
    weights = removal_weights(prior)
    assert weights.shape == (5,) and weights.dtype == torch.float64
    floor = EPSILON * 3.0
    expected = torch.tensor([0.0, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64) + floor
    assert torch.allclose(weights, expected, rtol=0, atol=1e-15)
    assert bool((weights > 0).all())


def test_removal_weights_of_an_equal_prior_are_uniform_and_positive():
    weights = removal_weights(torch.full((6,), 4.2))
    assert bool((weights > 0).all()) and bool((weights == weights[0]).all())
    assert removal_weights(torch.tensor([7.0])).tolist() == [EPSILON]


def test_removal_weights_are_shift_invariant():
    prior = torch.rand(15, generator=gen(0), dtype=torch.float64)
    assert torch.allclose(removal_weights(prior), removal_weights(prior + 123.0), atol=1e-9)


def test_removal_probabilities_do_not_depend_on_the_prior_scale():
    prior = torch.linspace(0, 1, 10, dtype=torch.float64)
    weights = removal_weights(prior)
    small = removal_weights(prior * 1e-6)
    assert torch.allclose(small / small.sum(), weights / weights.sum(), rtol=1e-6, atol=1e-12)


# --- edge cases and bad input -----------------------------------------------------------------


def test_degenerate_cases_keep_everything():
    prior, module_index = layout()
    no_fixed = torch.zeros(len(prior), dtype=torch.bool)
    all_fixed = torch.ones(len(prior), dtype=torch.bool)
    assert bool(sample_masks(prior, all_fixed, module_index, 0.2, 3, generator=gen(0)).all())
    assert bool(sample_masks(prior, no_fixed, module_index, 0.0, 3, generator=gen(0)).all())
    empty = sample_masks(prior, no_fixed, module_index, 0.2, 0, generator=gen(0))
    assert empty.shape == (0, len(prior)) and empty.dtype == torch.bool


def test_bad_input_is_rejected():
    prior, module_index = layout()
    fixed = torch.zeros(len(prior), dtype=torch.bool)
    with pytest.raises(ValueError, match="sample_fraction"):
        sample_masks(prior, fixed, module_index, -0.1, 2, generator=gen(0))
    with pytest.raises(ValueError, match="sample_fraction"):
        sample_masks(prior, fixed, module_index, 1.1, 2, generator=gen(0))
    with pytest.raises(ValueError, match="n_pairs"):
        sample_masks(prior, fixed, module_index, 0.2, -1, generator=gen(0))
    with pytest.raises(ValueError, match=r"\(U,\)"):
        sample_masks(prior, fixed[:-1], module_index, 0.2, 2, generator=gen(0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_candidate_prior_is_rejected(bad: float):
    prior, module_index = layout()
    prior = prior.clone()
    prior[0] = bad
    fixed = torch.zeros(len(prior), dtype=torch.bool)
    with pytest.raises(ValueError, match="non-finite"):
        sample_masks(prior, fixed, module_index, 0.2, 2, generator=gen(0))


def test_both_masks_of_a_pair_remove_round_f_n_at_a_decimal_half():
    prior = torch.rand(90, generator=gen(0), dtype=torch.float64)
    module_index = torch.zeros(90, dtype=torch.long)
    fixed = fixed_units(prior, module_index, 0.35)
    masks = fixed_count_masks(prior, fixed, module_index, 0.35, 2, generator=gen(0))
    assert (~masks).sum(dim=1).tolist() == [exact_removals(90, 0.35)] * 4


# --- varied and graded removal counts (graded is the default) -----------------------------------------------------


def test_varied_counts_span_zero_to_every_candidate_with_mean_half():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    masks = sample_masks(prior, fixed, module_index, 0.2, 2000, generator=gen(0))
    for module in range(len(SIZES)):
        candidates = (module_index == module) & ~fixed
        c = int(candidates.sum())
        removed = (~masks[0::2][:, module_index == module]).sum(dim=1)  # (P,)
        assert set(removed.tolist()) == set(range(c + 1)), module  # every count 0..c occurs
        assert float(removed.double().mean()) == pytest.approx(c / 2, abs=0.1 * c + 0.1)
        partner = (~masks[1::2][:, module_index == module]).sum(dim=1)
        assert torch.equal(removed + partner, torch.full_like(removed, c))


def test_varied_counts_are_drawn_per_module_not_once_per_mask():
    prior, module_index = layout((40, 40))
    fixed = fixed_units(prior, module_index, 0.25)
    masks = sample_masks(prior, fixed, module_index, 0.25, 500, generator=gen(1))
    a = (~masks[0::2][:, module_index == 0]).sum(dim=1).double()
    b = (~masks[0::2][:, module_index == 1]).sum(dim=1).double()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.15


@pytest.mark.parametrize("removal_counts", ["fixed", "varied", "graded"])
def test_every_mode_keep_fixed_units_complement_pairs_and_follow_the_prior(removal_counts):
    prior, module_index = layout((40, 40))
    fixed = fixed_units(prior, module_index, 0.25)
    masks = sample_masks(
        prior, fixed, module_index, 0.25, 1000, generator=gen(2), removal_counts=removal_counts
    )
    assert bool(masks[:, fixed].all())
    assert torch.equal(masks[0::2][:, ~fixed], ~masks[1::2][:, ~fixed])
    frequency = removal_frequency(masks)
    for module in (0, 1):
        candidates = (module_index == module) & ~fixed
        rho = spearmanr(prior[candidates].numpy(), frequency[candidates].numpy()).statistic
        assert rho < -0.9


def _first_mask_counts(removal_counts: str, sizes: tuple[int, ...], pairs: int) -> torch.Tensor:
    """(P, M) units the first mask of each pair removes per module."""
    prior, module_index = layout(sizes)
    fixed = fixed_units(prior, module_index, 0.25)
    masks = sample_masks(
        prior, fixed, module_index, 0.25, pairs, generator=gen(5), removal_counts=removal_counts
    )
    return torch.stack(
        [(~masks[0::2][:, module_index == m]).sum(dim=1) for m in range(len(sizes))], dim=1
    )


def test_graded_counts_keep_the_mean_and_span_but_spread_the_totals():
    sizes = (40,) * 12
    varied = _first_mask_counts("varied", sizes, 2000).double()  # (P, M)
    graded = _first_mask_counts("graded", sizes, 2000).double()
    c = 20  # candidates per module: the top 1 - 2f = half are fixed
    assert int(graded.min()) == 0 and int(graded.max()) == c
    assert float(graded.mean()) == pytest.approx(c / 2, abs=0.3)
    # a shared intensity: the total's sd grows by sqrt((M + 1) / 4) = 1.8 for M = 12 ...
    ratio = float(graded.sum(1).std() / varied.sum(1).std())
    assert 1.55 < ratio < 2.05
    # ... while each module keeps a variation of its own (correlation ~ 1/2, not 1)
    rho = float(torch.corrcoef(graded[:, :2].T)[0, 1])
    assert 0.35 < rho < 0.65


def test_varied_masks_depend_only_on_the_generator():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    first = sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(3))
    assert torch.equal(first, sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(3)))
    assert not torch.equal(
        first, sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(4))
    )


def test_unknown_removal_counts_is_rejected():
    prior, module_index = layout()
    fixed = torch.zeros(len(prior), dtype=torch.bool)
    with pytest.raises(ValueError, match="removal_counts"):
        sample_masks(prior, fixed, module_index, 0.2, 2, generator=gen(0), removal_counts="some")
