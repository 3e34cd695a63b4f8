"""Regression of utility on keep masks: recovery of known importances, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bonsai_prune.regression import fit_importance
from bonsai_prune.sampling import sample_masks

N_UNITS, N_MASKS, NOISE = 40, 200, 0.3
MODULE_INDEX = torch.arange(N_UNITS) % 2  # two interleaved modules of 20


def synthetic_round(
    seed: int = 0, design: str = "bernoulli"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (200, 40), scores (200,), true beta (40,)): utility = 3 + masks @ beta + noise.

    design "bernoulli": each unit kept with probability 1/2, independently. "bonsai": the
    project's sampler, antithetic pairs removing exactly 10 of each module of 20.
    """
    generator = torch.Generator().manual_seed(seed)
    true_beta = torch.linspace(-0.5, 2.0, N_UNITS, dtype=torch.float64)
    true_beta = true_beta[torch.randperm(N_UNITS, generator=generator)]
    if design == "bernoulli":
        masks = torch.rand(N_MASKS, N_UNITS, generator=generator) < 0.5  # (200, 40)
    else:
        masks = sample_masks(
            torch.ones(N_UNITS),
            torch.zeros(N_UNITS, dtype=torch.bool),
            MODULE_INDEX,
            0.5,
            N_MASKS // 2,
            generator=generator,
        )  # (200, 40)
    noise = NOISE * torch.randn(N_MASKS, generator=generator, dtype=torch.float64)
    scores = 3.0 + masks.double() @ true_beta + noise  # (200,)
    return masks, scores, true_beta


def centred_per_module(beta: torch.Tensor) -> torch.Tensor:
    """beta (40,) minus its module's mean: the part a fixed-count design identifies."""
    means = torch.stack([beta[MODULE_INDEX == m].mean() for m in (0, 1)])  # (2,)
    return beta - means[MODULE_INDEX]


@pytest.mark.parametrize("method", ["ridge", "lasso"])
def test_recovers_known_unit_importances(method: str):
    masks, scores, true_beta = synthetic_round()
    fit = fit_importance(masks, scores, method=method)
    assert fit.method == method
    assert fit.beta.shape == (N_UNITS,) and fit.beta.dtype == torch.float64
    assert spearmanr(fit.beta.numpy(), true_beta.numpy()).statistic > 0.95
    assert float((fit.beta - true_beta).abs().max()) < 0.25
    clear = true_beta.abs() > 0.25
    assert torch.equal(fit.beta.sign()[clear], true_beta.sign()[clear])
    assert abs(fit.intercept - 3.0) < 0.5  # the utility with every candidate removed
    assert 0 < fit.cv_error < 2 * NOISE**2  # held-out error near the noise variance
    assert fit.alpha > 0


@pytest.mark.parametrize("method", ["ridge", "lasso"])
def test_recovers_within_module_importances_from_antithetic_masks(method: str):
    # every mask keeps exactly 10 units of each module, so each module's beta is known only
    # up to a constant shared by its units: compare the module-centred values
    masks, scores, true_beta = synthetic_round(design="bonsai")
    fit = fit_importance(masks, scores, method=method)
    fitted, true = centred_per_module(fit.beta), centred_per_module(true_beta)
    assert spearmanr(fitted.numpy(), true.numpy()).statistic > 0.95
    assert float((fitted - true).abs().max()) < 0.25
    assert 0 < fit.cv_error < 2 * NOISE**2


def test_beta_is_in_utility_units():
    masks, scores, _ = synthetic_round(1)
    fit = fit_importance(masks, scores)
    scaled = fit_importance(masks, 1000 * scores - 7)
    assert torch.allclose(scaled.beta, 1000 * fit.beta, rtol=1e-6, atol=1e-9)
    assert scaled.intercept == pytest.approx(1000 * fit.intercept - 7, rel=1e-6)
    assert scaled.cv_error == pytest.approx(1e6 * fit.cv_error, rel=1e-6)
    assert scaled.alpha == pytest.approx(fit.alpha)


def test_explicit_alpha_grid_is_searched():
    masks, scores, _ = synthetic_round()
    for method in ("ridge", "lasso"):
        grid = [0.001, 0.01, 0.1]
        assert fit_importance(masks, scores, method=method, alphas=grid).alpha in grid


def test_constant_scores_give_zero_beta():
    masks, _, _ = synthetic_round()
    fit = fit_importance(masks, torch.full((N_MASKS,), 2.5))
    assert torch.equal(fit.beta, torch.zeros(N_UNITS, dtype=torch.float64))
    assert fit.intercept == 2.5 and fit.cv_error == 0.0


def test_fewer_masks_than_folds():
    masks, scores, _ = synthetic_round()
    for method in ("ridge", "lasso"):
        fit = fit_importance(masks[:3], scores[:3], method=method, n_folds=5)
        assert fit.beta.shape == (N_UNITS,)
        assert np.isfinite(fit.cv_error)


def test_a_never_removed_unit_gets_no_importance():
    masks, scores, _ = synthetic_round()
    masks = masks.clone()
    masks[:, 0] = True  # a constant column: the data says nothing about unit 0
    assert float(fit_importance(masks, scores).beta[0]) == pytest.approx(0.0, abs=1e-9)


def test_bad_input_is_rejected():
    masks, scores, _ = synthetic_round()
    broken = scores.clone()
    broken[3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        fit_importance(masks, broken)
    with pytest.raises(ValueError, match="unknown regression"):
        fit_importance(masks, scores, method="elastic")
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fit_importance(masks, scores[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        fit_importance(masks[:1], scores[:1])
