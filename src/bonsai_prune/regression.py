"""Estimating each unit's importance: regress the utility on the keep masks.

``utility(mask) ~ intercept + sum_j beta_j * mask_j``: beta_j is what keeping unit j adds to
the utility, all else equal. The regularisation strength is chosen by K-fold held-out error
(scikit-learn's RidgeCV / LassoCV). Paper: https://arxiv.org/abs/2402.05406 (section 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_ALPHAS = tuple(np.logspace(-4, 3, 15))


@dataclass(frozen=True)
class RegressionFit:
    beta: torch.Tensor  # (C,) float64, utility units per kept unit
    intercept: float
    alpha: float  # chosen regularisation strength (on standardised scores)
    cv_error: float  # mean held-out squared error at alpha, in utility units squared
    method: str


def fit_importance(
    masks: torch.Tensor,
    scores: torch.Tensor,
    *,
    method: str = "ridge",
    alphas: Sequence[float] | None = None,
    n_folds: int = 5,
) -> RegressionFit:
    """Fit beta from masks (N, C) bool and scores (N,) finite floats."""
    from sklearn.linear_model import LassoCV, RidgeCV
    from sklearn.model_selection import KFold

    x = masks.double().cpu().numpy()  # (N, C)
    y = scores.double().cpu().numpy()  # (N,)
    if not np.isfinite(y).all():
        raise ValueError("scores must be finite; replace failed sub-models first")
    n_samples, n_features = x.shape
    mean, std = float(y.mean()), float(y.std())
    if std == 0 or n_features == 0:
        return RegressionFit(torch.zeros(n_features, dtype=torch.float64), mean, 0.0, 0.0, method)
    y_std = (y - mean) / std
    alphas = list(alphas or DEFAULT_ALPHAS)
    folds = KFold(n_splits=max(2, min(n_folds, n_samples)), shuffle=True, random_state=0)
    if method == "ridge":
        model = RidgeCV(alphas=alphas, cv=folds, scoring="neg_mean_squared_error").fit(x, y_std)
        alpha = float(model.alpha_)
        cv = -float(model.best_score_)
    elif method == "lasso":
        # Lasso's alpha scale differs from ridge's: let scikit-learn build its own path
        model = LassoCV(cv=folds, random_state=0, max_iter=5000).fit(x, y_std)
        alpha = float(model.alpha_)
        cv = float(model.mse_path_.mean(axis=1).min())
    else:
        raise ValueError(f"unknown regression {method!r}; choose ridge or lasso")
    beta = torch.from_numpy(np.asarray(model.coef_, dtype=np.float64) * std)
    intercept = float(model.intercept_) * std + mean
    return RegressionFit(beta, intercept, alpha, cv * std**2, method)
