"""Regression of utility on keep masks: recovery of known importances, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bonsai_prune.core.regression import RegressionFit, default_alphas, fit_importance
from bonsai_prune.core.sampling import sample_masks

N_UNITS, N_MASKS, NOISE = 40, 200, 0.3
MODULE_INDEX = torch.arange(N_UNITS) % 2  # two interleaved modules of 20
METHODS = ["ridge", "lasso"]


def synthetic_round(
    seed: int = 0, design: str = "bernoulli"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masks (200, 40), scores (200,), true beta (40,)): utility = 3 + masks @ beta + noise.

    design "bernoulli": each unit kept with probability 1/2, independently. "fixed" and
    "varied": the project's sampler, antithetic pairs removing exactly 10 of each module of 20
    ("fixed", Bonsai's) or a uniform 0..20 of each module ("varied").
    Effects span -0.5 to 2 (0.064 apart); the noise sd is 0.3.
    """
    generator = torch.Generator().manual_seed(seed)
    true_beta = torch.linspace(-0.5, 2.0, N_UNITS, dtype=torch.float64)
    true_beta = true_beta[torch.randperm(N_UNITS, generator=generator)]  # (40,)
    if design == "bernoulli":
        masks = torch.rand(N_MASKS, N_UNITS, generator=generator) < 0.5  # (200, 40)
    else:
        masks = sampled_masks(design, generator)
    return masks, noisy_utility(masks, true_beta, generator), true_beta


def sampled_masks(removal_counts: str, generator: torch.Generator) -> torch.Tensor:
    """(200, 40) masks from the project's sampler: uniform prior, no fixed unit, f = 0.5."""
    return sample_masks(
        torch.ones(N_UNITS),
        torch.zeros(N_UNITS, dtype=torch.bool),
        MODULE_INDEX,
        0.5,
        N_MASKS // 2,
        generator=generator,
        removal_counts=removal_counts,
    )


def noisy_utility(
    masks: torch.Tensor, true_beta: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(200,) utility = 3 + masks @ beta + N(0, NOISE^2)."""
    noise = NOISE * torch.randn(N_MASKS, generator=generator, dtype=torch.float64)
    return 3.0 + masks.double() @ true_beta + noise


def module_means(beta: torch.Tensor) -> torch.Tensor:
    """(2,) mean beta of each module: what a fixed-count design cannot identify."""
    return torch.stack([beta[MODULE_INDEX == m].mean() for m in (0, 1)])


def centred_per_module(beta: torch.Tensor) -> torch.Tensor:
    """beta (40,) minus its module's mean: the part a fixed-count design identifies."""
    return beta - module_means(beta)[MODULE_INDEX]


# --- recovery -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_recovers_known_unit_importances(method: str):
    masks, scores, true_beta = synthetic_round()
    fit = fit_importance(masks, scores, method=method)
    assert isinstance(fit, RegressionFit) and fit.method == method
    assert fit.beta.shape == (N_UNITS,) and fit.beta.dtype == torch.float64
    assert spearmanr(fit.beta.numpy(), true_beta.numpy()).statistic > 0.95
    # close in scale, not merely in order: slope and norm near 1, small errors
    slope = float(fit.beta @ true_beta / (true_beta @ true_beta))
    assert 0.9 < slope < 1.1
    assert 0.9 < float(fit.beta.norm() / true_beta.norm()) < 1.1
    assert float((fit.beta - true_beta).abs().max()) < 0.25
    clear = true_beta.abs() > 0.25
    assert torch.equal(fit.beta.sign()[clear], true_beta.sign()[clear])
    assert abs(fit.intercept - 3.0) < 0.5  # the utility with every candidate removed
    assert 0 < fit.cv_error < 2 * NOISE**2  # held-out error near the noise variance
    assert fit.alpha > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [1, 2])
def test_recovery_holds_for_other_draws(method: str, seed: int):
    masks, scores, true_beta = synthetic_round(seed)
    fit = fit_importance(masks, scores, method=method)
    assert spearmanr(fit.beta.numpy(), true_beta.numpy()).statistic > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_recovers_within_module_importances_from_antithetic_masks(method: str):
    # every mask keeps exactly 10 units of each module, so each module's beta is known only
    # up to a constant shared by its units: compare the module-centred values
    masks, scores, true_beta = synthetic_round(design="fixed")
    fit = fit_importance(masks, scores, method=method)
    fitted, true = centred_per_module(fit.beta), centred_per_module(true_beta)
    assert spearmanr(fitted.numpy(), true.numpy()).statistic > 0.95
    assert float((fitted - true).abs().max()) < 0.25
    assert 0 < fit.cv_error < 2 * NOISE**2


def test_varied_and_graded_counts_identify_which_module_matters_and_fixed_counts_do_not():
    # module 1's units matter far more than module 0's: a selection that compares modules
    # must see it. Fixed counts centre each module's betas; varied counts recover the truth.
    generator = torch.Generator().manual_seed(5)
    true_beta = torch.where(MODULE_INDEX == 1, 1.0, 0.1).double()
    true_beta += 0.05 * torch.randn(N_UNITS, generator=generator, dtype=torch.float64)
    gaps = {}
    for design in ("fixed", "varied", "graded"):
        masks = sampled_masks(design, generator)
        fit = fit_importance(masks, noisy_utility(masks, true_beta, generator))
        means = module_means(fit.beta)
        gaps[design] = float(means[1] - means[0])
    assert abs(gaps["fixed"]) < 0.2  # true gap 0.9: invisible to the fixed-count design
    assert 0.6 < gaps["varied"] < 1.2
    assert 0.6 < gaps["graded"] < 1.2  # the shared intensity keeps module effects estimable


@pytest.mark.parametrize("method", METHODS)
def test_a_tiny_penalty_gives_least_squares(method: str):
    masks, scores, _ = synthetic_round()
    fit = fit_importance(masks, scores, method=method, alphas=[1e-10])
    design = np.column_stack([np.ones(N_MASKS), masks.double().numpy()])  # (200, 41)
    solution = np.linalg.lstsq(design, scores.numpy(), rcond=None)[0]  # (41,)
    np.testing.assert_allclose(fit.beta.numpy(), solution[1:], atol=1e-6)
    assert fit.intercept == pytest.approx(solution[0], abs=1e-6)


def test_lasso_finds_a_sparse_truth_and_zeroes_the_rest():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(N_MASKS, N_UNITS, generator=generator) < 0.5  # (200, 40)
    true_beta = torch.zeros(N_UNITS, dtype=torch.float64)
    support = torch.tensor([3, 11, 20, 29, 38])
    true_beta[support] = torch.tensor([1.0, 1.5, 2.0, -1.0, 1.2], dtype=torch.float64)
    noise = 0.2 * torch.randn(N_MASKS, generator=generator, dtype=torch.float64)
    scores = 3.0 + masks.double() @ true_beta + noise  # (200,)
    lasso = fit_importance(masks, scores, method="lasso")
    ridge = fit_importance(masks, scores, method="ridge")
    for fit in (lasso, ridge):
        assert fit.beta.abs().topk(5).indices.sort().values.tolist() == support.tolist()
    assert int((lasso.beta == 0).sum()) >= 20
    assert int((ridge.beta == 0).sum()) == 0
    assert float(lasso.beta[true_beta == 0].abs().max()) < 0.1


# --- units and scaling ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_beta_is_in_utility_units(method: str):
    masks, scores, _ = synthetic_round(1)
    fit = fit_importance(masks, scores, method=method)
    scaled = fit_importance(masks, 1000 * scores - 7, method=method)
    assert torch.allclose(scaled.beta, 1000 * fit.beta, rtol=1e-6, atol=1e-9)
    assert scaled.intercept == pytest.approx(1000 * fit.intercept - 7, rel=1e-6)
    assert scaled.cv_error == pytest.approx(1e6 * fit.cv_error, rel=1e-6)
    assert scaled.alpha == pytest.approx(fit.alpha)


def test_explicit_alpha_grid_is_searched():
    masks, scores, _ = synthetic_round()
    grid = [0.001, 0.01, 0.1]
    for method in METHODS:
        assert fit_importance(masks, scores, method=method, alphas=grid).alpha in grid


def test_a_heavier_penalty_shrinks_beta():
    masks, scores, _ = synthetic_round()
    for method in METHODS:
        light = fit_importance(masks, scores, method=method, alphas=[1e-3])
        heavy = fit_importance(masks, scores, method=method, alphas=[1e3])
        assert float(heavy.beta.norm()) < 0.5 * float(light.beta.norm())


def test_fit_is_deterministic_and_leaves_its_inputs_alone():
    masks, scores, _ = synthetic_round()
    copies = masks.clone(), scores.clone()
    for method in METHODS:
        first = fit_importance(masks, scores, method=method)
        again = fit_importance(masks, scores, method=method)
        assert torch.equal(first.beta, again.beta) and first.alpha == again.alpha
    assert torch.equal(masks, copies[0]) and torch.equal(scores, copies[1])


def test_default_alpha_grids_are_scaled_to_the_data():
    masks, scores, _ = synthetic_round()
    x = masks.double().numpy()  # (200, 40)
    y = scores.numpy()
    y_std = (y - y.mean()) / y.std()  # (200,)
    ridge = default_alphas(x, y_std, "ridge")
    lasso = default_alphas(x, y_std, "lasso")
    assert all(a > 0 for a in ridge + lasso)
    assert ridge == sorted(ridge) and lasso == sorted(lasso)
    # lasso's largest alpha is the smallest one at which every beta is zero
    from sklearn.linear_model import Lasso

    assert not Lasso(alpha=lasso[-1]).fit(x, y_std).coef_.any()
    assert Lasso(alpha=0.9 * lasso[-1]).fit(x, y_std).coef_.any()
    # twice the units' spread, twice the ridge grid
    assert default_alphas(2 * x, y_std, "ridge") == pytest.approx([4 * a for a in ridge])


# --- degenerate input -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [2.5, 0.1, -3.7, 1e6 + 0.3])
def test_constant_scores_give_zero_beta(method: str, value: float):
    masks, _, _ = synthetic_round()
    fit = fit_importance(masks, torch.full((N_MASKS,), value, dtype=torch.float64), method=method)
    assert torch.equal(fit.beta, torch.zeros(N_UNITS, dtype=torch.float64))
    assert fit.intercept == pytest.approx(value)
    assert abs(fit.cv_error) < 1e-12


def test_constant_scores_report_zero_alpha_for_any_constant():
    masks, _, _ = synthetic_round()
    fit = fit_importance(masks, torch.full((N_MASKS,), -3.7, dtype=torch.float64))
    assert fit.alpha == 0.0 and fit.cv_error == 0.0


def test_no_candidates_give_an_empty_beta():
    _, scores, _ = synthetic_round()
    fit = fit_importance(torch.zeros((N_MASKS, 0), dtype=torch.bool), scores)
    assert fit.beta.shape == (0,)
    assert fit.intercept == pytest.approx(float(scores.mean()))


def test_a_never_removed_unit_gets_no_importance():
    masks, scores, _ = synthetic_round()
    masks = masks.clone()
    masks[:, 0] = True  # a constant column: the data says nothing about unit 0
    for method in METHODS:
        beta = fit_importance(masks, scores, method=method).beta
        assert float(beta[0]) == pytest.approx(0.0, abs=1e-9)


def test_fewer_masks_than_folds():
    masks, scores, _ = synthetic_round()
    for method in METHODS:
        for n in (2, 3):
            fit = fit_importance(masks[:n], scores[:n], method=method, n_folds=5)
            assert fit.beta.shape == (N_UNITS,)
            assert bool(torch.isfinite(fit.beta).all()) and np.isfinite(fit.cv_error)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_scores_raise(bad: float, method: str):
    masks, scores, _ = synthetic_round()
    broken = scores.clone()
    broken[3] = bad
    with pytest.raises(ValueError, match="finite"):
        fit_importance(masks, broken, method=method)


def test_bad_input_is_rejected():
    masks, scores, _ = synthetic_round()
    with pytest.raises(ValueError, match="unknown regression"):
        fit_importance(masks, scores, method="elastic")
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fit_importance(masks, scores[:-1])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fit_importance(masks[0], scores)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fit_importance(masks, scores[:, None])
    with pytest.raises(ValueError, match="at least 2"):
        fit_importance(masks[:1], scores[:1])
    with pytest.raises(ValueError, match="n_folds"):
        fit_importance(masks, scores, n_folds=1)


def test_the_heaviest_penalty_is_reported():
    masks, scores, _ = synthetic_round()
    assert not fit_importance(masks, scores, method="ridge").at_max_penalty  # a real signal
    noise = torch.randn(
        scores.shape, generator=torch.Generator().manual_seed(0), dtype=scores.dtype
    )
    grid = [1e-3, 1e6]
    assert fit_importance(masks, noise, method="ridge", alphas=grid).at_max_penalty is True


def test_a_prior_scale_is_ridge_on_scaled_columns():
    # penalty alpha * sum(beta_j^2 / s_j^2): fit x * s, then scale the coefficients back by s
    masks, scores, _ = synthetic_round(seed=1)
    scale = torch.linspace(0.5, 8.0, N_UNITS, dtype=torch.float64)
    fit = fit_importance(masks, scores, method="ridge", prior_scale=scale)
    by_hand = fit_importance(masks.double() * scale, scores, method="ridge")
    assert torch.allclose(fit.beta, by_hand.beta * scale, rtol=1e-9, atol=1e-12)
    assert fit.alpha == by_hand.alpha and fit.intercept == pytest.approx(by_hand.intercept)


def test_a_larger_prior_scale_lets_a_unit_keep_more_of_its_effect():
    # two units of equal true effect: the one with the larger prior scale is shrunk less
    masks, scores, _ = synthetic_round(seed=2)
    scale = torch.ones(N_UNITS, dtype=torch.float64)
    scale[:20] = 4.0
    plain = fit_importance(masks, scores, method="ridge", alphas=[50.0])
    scaled = fit_importance(masks, scores, method="ridge", alphas=[50.0], prior_scale=scale)
    gain = scaled.beta.abs() / plain.beta.abs()
    assert gain[:20].median() > gain[20:].median()


def test_a_constant_prior_scale_changes_nothing():
    masks, scores, _ = synthetic_round(seed=3)
    plain = fit_importance(masks, scores, method="ridge")
    scaled = fit_importance(masks, scores, method="ridge", prior_scale=torch.full((40,), 7.0))
    assert torch.allclose(plain.beta, scaled.beta, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", [torch.zeros(40), torch.ones(39), torch.full((40,), math.nan)])
def test_a_bad_prior_scale_is_rejected(scale):
    masks, scores, _ = synthetic_round(seed=3)
    with pytest.raises(ValueError, match="prior_scale"):
        fit_importance(masks, scores, prior_scale=scale)
