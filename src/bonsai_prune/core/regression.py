"""Estimating each unit's importance: regress the utility on the keep masks.

``utility(mask) ~ intercept + sum_j beta_j * mask_j`` over the round's candidate units:
beta_j is what keeping unit j adds to the utility, all else equal. Ridge (L2) or lasso (L1)
regularisation, its strength chosen by K-fold held-out squared error, by scikit-learn's
RidgeCV / LassoCV. The folds keep each antithetic pair (rows 2i and 2i+1) together: after
centring, the two rows of a pair are exact negatives of each other, so a pair split across
folds leaks the held-out row into the fit and makes the held-out error optimistic. Scores are standardised before the fit, so a grid suits any utility scale,
and beta is scaled back into utility units.

A caveat of Bonsai's design: when every mask keeps the same number of a module's candidates
(``sampling.sample_masks(..., removal_counts="fixed")``, up to the antithetic parity), adding a
constant to all of a module's betas changes no prediction, so the data fix beta only within
each module. Ridge resolves this with its minimum-norm solution (each module's betas centred,
roughly); lasso with whichever sparse solution its path reaches. Cross-module comparisons of
beta then rest on that choice, not on the data. ``removal_counts="varied"`` and the default
``"graded"`` draw the count per mask and module, which makes the module-level effects
estimable too.

Units of different sizes (a head holds 57x a neuron's parameters in SmolLM2) need different
priors. With a few dozen sub-models and thousands of units, the fit is mostly its penalty: ridge
with one alpha for every unit gives each beta about the covariance of its column with the
score, on the same scale for a head and a neuron, so selection removes both at the same rate
by count, and heads went first per parameter. ``prior_scale`` sets each beta's prior standard
deviation (``BETA_PRIORS``: "cost" = sqrt of the unit's parameters, a prior variance
proportional to its size): the column is multiplied by it before the fit and the coefficient
after, i.e. the penalty is ``alpha * sum(beta_j^2 / cost_j)``. Measured on the packaged model,
round 1 at 10%, same 32 sub-models (scripts/selection_study.py): held-out reference perplexity
4.76 with one alpha, 4.28 with the cost prior (dense 3.82).

Paper: Dery et al., "Everybody Prune Now", https://arxiv.org/abs/2402.05406 (section 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FITS = ("ridge", "lasso")  # what ``fit_importance`` fits
# what a round's importance may come from: a fit over the units, or ridge over modules with the
# prior within each (``core/allocation.py``)
REGRESSIONS = (*FITS, "modules")
# each beta's prior scale: the same for every unit, or the sqrt of the unit's parameters
BETA_PRIORS = ("uniform", "cost")
RIDGE_GRID = tuple(np.logspace(-3, 2, 11))  # times the design's mean eigenvalue, see below
LASSO_GRID = tuple(np.logspace(-3, 0, 13))  # times the smallest alpha that zeroes every beta
LASSO_MAX_ITER = 5000


@dataclass(frozen=True)
class RegressionFit:
    """One round's regression: an importance per candidate unit and how well it predicts."""

    beta: torch.Tensor  # (C,) float64, utility gained by keeping each candidate unit
    intercept: float  # predicted utility with every candidate removed
    alpha: float  # chosen regularisation strength (scikit-learn's scale, standardised scores)
    cv_error: float  # mean held-out squared error at alpha, in utility units squared
    method: str  # "ridge" or "lasso"
    # the search chose its heaviest penalty: the data favour predicting the mean (a sign of no
    # signal, with a held-out R^2 <= 0; see utility/validity.py)
    at_max_penalty: bool = False


def fit_importance(
    masks: torch.Tensor,
    scores: torch.Tensor,
    *,
    method: str = "ridge",
    alphas: Sequence[float] | None = None,
    n_folds: int = 5,
    groups: np.ndarray | None = None,
    prior_scale: torch.Tensor | None = None,
) -> RegressionFit:
    """Fit beta (C,) from keep masks (N, C) bool over the candidates and utilities (N,).

    masks: the sampled keep masks restricted to the candidate columns (``masks[:, ~fixed]``);
    scores: the utility of each masked sub-model, finite (replace failures first);
    method: "ridge" or "lasso"; alphas: the grid to search (default: scaled to the data, see
    ``default_alphas``); n_folds: K of the K-fold search, lowered to the number of groups when
    there are fewer; groups (N,): rows that must share a fold, default ``arange(N) // 2`` (the
    antithetic pairs of ``sampling.sample_masks``); prior_scale (C,) > 0, optional: each beta's
    prior standard deviation up to a common factor (see the module docstring), e.g. the sqrt of
    each unit's parameters.

    Constant scores carry no information: beta is all zeros, alpha and cv_error are 0.
    """
    from sklearn.linear_model import LassoCV, RidgeCV  # deferred: a slow import
    from sklearn.model_selection import GroupKFold

    if method not in FITS:
        raise ValueError(f"unknown regression {method!r}; choose one of: {', '.join(FITS)}")
    if masks.dim() != 2 or scores.dim() != 1 or masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"masks must be (N, C) and scores (N,), got {tuple(masks.shape)} and "
            f"{tuple(scores.shape)}"
        )
    x = masks.detach().cpu().double().numpy()  # (N, C)
    scale = None
    if prior_scale is not None:
        scale = prior_scale.detach().cpu().double().numpy()  # (C,)
        if scale.shape != (x.shape[1],) or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"prior_scale must be ({x.shape[1]},) finite and > 0")
        x = x * scale
    y = scores.detach().cpu().double().numpy()  # (N,)
    if not np.isfinite(y).all():
        raise ValueError("scores must be finite; replace failed sub-models before the fit")
    n_samples, n_features = x.shape
    if n_samples < 2:
        raise ValueError(f"need at least 2 scored masks to fit, got {n_samples}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    mean, std = float(y.mean()), float(y.std())
    if np.ptp(y) == 0.0 or n_features == 0:  # constant: std can come out 1e-16, not 0
        beta = torch.zeros(n_features, dtype=torch.float64)
        return RegressionFit(beta, mean, 0.0, 0.0, method)
    y_std = (y - mean) / std  # (N,) mean 0, variance 1
    grid = list(alphas) if alphas is not None else default_alphas(x, y_std, method)
    groups = np.arange(n_samples) // 2 if groups is None else np.asarray(groups)
    if len(np.unique(groups)) < 2:  # a single pair: nothing to hold out but its rows
        groups = np.arange(n_samples)
    n_groups = len(np.unique(groups))
    splitter = GroupKFold(n_splits=min(n_folds, n_groups), shuffle=True, random_state=0)
    folds = list(splitter.split(x, y_std, groups))
    if method == "ridge":
        model = RidgeCV(alphas=grid, cv=folds, scoring="neg_mean_squared_error").fit(x, y_std)
        cv_error = -float(model.best_score_)
    else:
        model = LassoCV(alphas=grid, cv=folds, max_iter=LASSO_MAX_ITER).fit(x, y_std)
        at_alpha = int(np.argmin(np.abs(model.alphas_ - model.alpha_)))
        cv_error = float(model.mse_path_[at_alpha].mean())  # mse_path_: (n_alphas, n_folds)
    coef = np.asarray(model.coef_, dtype=np.float64) * (1.0 if scale is None else scale)
    beta = torch.from_numpy(coef * std)  # (C,)
    intercept = float(model.intercept_) * std + mean
    at_max = bool(float(model.alpha_) >= float(max(grid)) * (1 - 1e-9))  # a bool, not numpy's
    return RegressionFit(
        beta, intercept, float(model.alpha_), cv_error * std**2, method, at_max_penalty=at_max
    )


def default_alphas(x: np.ndarray, y_std: np.ndarray, method: str) -> list[float]:
    """A grid of alphas scaled to the design x (N, C), so it fits any number of units and masks.

    Ridge: a fixed grid would mean light shrinkage with 40 candidates and none at all with
    20,000 (the penalty competes with eigenvalues that grow with C). So the grid is relative
    to the mean non-zero eigenvalue of the centred Gram matrix, ``N * sum(var_j) / min(N, C)``:
    from near-interpolation (1e-3 x) to heavy shrinkage, where beta ranks units by their
    correlation with the utility (1e2 x). Lasso: relative to ``max|x_c^T y| / N``, the
    smallest alpha at which every beta is zero (what LassoCV's own path does, with a fixed
    size that does not depend on the scikit-learn version).
    """
    n_samples, n_features = x.shape
    if method == "ridge":
        scale = n_samples * float(x.var(axis=0).sum()) / min(n_samples, n_features)
        relative = RIDGE_GRID
    else:
        centred = x - x.mean(axis=0)  # (N, C)
        scale = float(np.abs(centred.T @ y_std).max()) / n_samples
        relative = LASSO_GRID
    scale = scale if scale > 0 else 1.0  # every column constant: any alpha gives beta = 0
    return [scale * r for r in relative]
