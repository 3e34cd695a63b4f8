"""Antithetic keep masks: fractions, fixed units, complements, seeds and sampling weights."""

from __future__ import annotations

import pytest
import torch

from bonsai_prune.priors import fixed_units
from bonsai_prune.sampling import removal_weights, sample_masks

# three modules: 9 "heads", 40 and 25 "neurons", interleaved to catch index mix-ups
SIZES = (9, 40, 25)


def layout() -> tuple[torch.Tensor, torch.Tensor]:
    """(prior (U,), module_index (U,)) with modules stored out of order."""
    module_index = torch.cat([torch.full((n,), m) for m, n in enumerate(SIZES)])
    module_index = module_index[torch.randperm(len(module_index), generator=gen(99))]
    prior = torch.rand(len(module_index), generator=gen(7), dtype=torch.float64)
    return prior, module_index


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_masks_keep_fixed_units_and_remove_the_fraction_of_each_module():
    prior, module_index = layout()
    fraction = 0.2
    fixed = fixed_units(prior, module_index, fraction)
    masks = sample_masks(prior, fixed, module_index, fraction, 16, generator=gen(0))
    assert masks.shape == (32, len(prior)) and masks.dtype == torch.bool
    assert bool(masks[:, fixed].all())  # fixed units are never removed
    for module, n in enumerate(SIZES):
        in_module = module_index == module
        removed = (~masks[:, in_module]).sum(dim=1)  # (N,)
        k = int(fraction * n + 0.5)
        n_candidates = int((in_module & ~fixed).sum())
        assert bool((removed[0::2] == k).all())
        assert bool((removed[1::2] == n_candidates - k).all())


def test_pair_partners_are_complements_within_the_candidates():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)
    masks = sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(0))
    first, second = masks[0::2], masks[1::2]  # (P, U) each
    assert torch.equal(first[:, ~fixed], ~second[:, ~fixed])
    assert bool(first[:, fixed].all()) and bool(second[:, fixed].all())


def test_same_generator_seed_same_masks_other_seed_other_masks():
    prior, module_index = layout()
    fixed = fixed_units(prior, module_index, 0.2)

    def draw(seed: int) -> torch.Tensor:
        return sample_masks(prior, fixed, module_index, 0.2, 8, generator=gen(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_removal_frequency_is_proportional_to_the_gap_from_the_max():
    # one module, k = 1 removal per first mask: P(remove j) = w_j / sum(w) exactly
    prior = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64)
    module_index = torch.zeros(10, dtype=torch.long)
    fixed = torch.zeros(10, dtype=torch.bool)
    n_pairs = 4000
    masks = sample_masks(prior, fixed, module_index, 0.1, n_pairs, generator=gen(0))
    frequency = (~masks[0::2]).double().mean(dim=0)  # (10,)
    expected = removal_weights(prior) / removal_weights(prior).sum()
    sigma = (expected * (1 - expected) / n_pairs).sqrt()
    assert bool(((frequency - expected).abs() < 4 * sigma + 1e-9).all())
    assert frequency[-1] < 0.001  # the max-prior unit has only the epsilon floor


def test_low_prior_candidates_are_removed_more_often():
    prior = torch.linspace(0, 1, 40, dtype=torch.float64)
    module_index = torch.zeros(40, dtype=torch.long)
    fixed = torch.zeros(40, dtype=torch.bool)
    masks = sample_masks(prior, fixed, module_index, 0.2, 500, generator=gen(3))
    frequency = (~masks[0::2]).double().mean(dim=0)  # (40,)
    quarter = frequency.reshape(4, 10).mean(dim=1)  # lowest prior quarter first
    assert bool((quarter[:-1] > quarter[1:]).all())


def test_uniform_prior_samples_candidates_uniformly():
    prior = torch.ones(20, dtype=torch.float64)
    module_index = torch.zeros(20, dtype=torch.long)
    fixed = torch.zeros(20, dtype=torch.bool)
    masks = sample_masks(prior, fixed, module_index, 0.25, 2000, generator=gen(5))
    frequency = (~masks[0::2]).double().mean(dim=0)
    assert torch.allclose(frequency, torch.full((20,), 0.25, dtype=torch.float64), atol=0.04)


def test_a_module_with_candidates_loses_at_least_one_unit():
    # round(0.02 * 9) = 0, but the module has candidates: they must be perturbed
    prior = torch.arange(9, dtype=torch.float64)
    module_index = torch.zeros(9, dtype=torch.long)
    fixed = torch.tensor([True] * 7 + [False] * 2)
    masks = sample_masks(prior, fixed, module_index, 0.02, 4, generator=gen(0))
    assert bool(((~masks[0::2]).sum(dim=1) == 1).all())
    assert bool(((~masks[1::2]).sum(dim=1) == 1).all())


def test_degenerate_cases_keep_everything():
    prior, module_index = layout()
    no_fixed = torch.zeros(len(prior), dtype=torch.bool)
    all_fixed = torch.ones(len(prior), dtype=torch.bool)
    assert bool(sample_masks(prior, all_fixed, module_index, 0.2, 3, generator=gen(0)).all())
    assert bool(sample_masks(prior, no_fixed, module_index, 0.0, 3, generator=gen(0)).all())
    assert sample_masks(prior, no_fixed, module_index, 0.2, 0, generator=gen(0)).shape == (
        0,
        len(prior),
    )


def test_bad_input_is_rejected():
    prior, module_index = layout()
    fixed = torch.zeros(len(prior), dtype=torch.bool)
    with pytest.raises(ValueError, match="prune_fraction"):
        sample_masks(prior, fixed, module_index, -0.1, 2, generator=gen(0))
    with pytest.raises(ValueError, match=r"\(U,\)"):
        sample_masks(prior, fixed[:-1], module_index, 0.2, 2, generator=gen(0))


def test_non_finite_candidate_prior_is_rejected():
    prior, module_index = layout()
    prior = prior.clone()
    prior[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sample_masks(
            prior, torch.zeros(len(prior), dtype=torch.bool), module_index, 0.2, 2, generator=gen(0)
        )
