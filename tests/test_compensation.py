"""The least-squares refit of a projection's kept columns (core/compensation.py)."""

from __future__ import annotations

import pytest
import torch

from bonsai_prune.core.compensation import refit_kept_columns


def _data(seed: int = 0, tokens: int = 400, channels: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    w = torch.randn(out, channels, generator=g, dtype=torch.float64)
    kept = torch.ones(channels, dtype=torch.bool)
    kept[[1, 4, 7]] = False
    return x, w, kept


def test_removed_channels_that_are_combinations_of_kept_ones_are_absorbed_exactly():
    x, w, kept = _data()
    x[:, ~kept] = x[:, kept] @ torch.randn(int(kept.sum()), 3, dtype=torch.float64)
    refit = refit_kept_columns(w, x.T @ x, kept, damping=0.0)
    assert torch.allclose(x[:, kept] @ refit[:, kept].T, x @ w.T, atol=1e-8)


def test_the_refit_never_fits_the_calibration_outputs_worse_than_dropping():
    for seed in range(5):
        x, w, kept = _data(seed)
        target = x @ w.T
        refit = refit_kept_columns(w, x.T @ x, kept, damping=0.0)
        dropped = (x[:, kept] @ w[:, kept].T - target).norm()
        fitted = (x[:, kept] @ refit[:, kept].T - target).norm()
        assert fitted < dropped
        assert torch.equal(refit[:, ~kept], w[:, ~kept])  # slicing drops them


def test_nothing_to_refit_and_bad_shapes():
    x, w, kept = _data()
    gram = x.T @ x
    assert refit_kept_columns(w, gram, torch.ones_like(kept)) is w
    assert refit_kept_columns(w, gram, torch.zeros_like(kept)) is w
    half = refit_kept_columns(w.float(), gram, kept)
    assert half.dtype == torch.float32  # computed in float64, returned as given
    with pytest.raises(ValueError, match="needs a \\(12, 12\\) gram"):
        refit_kept_columns(w, gram[:5, :5], kept)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        refit_kept_columns(w, gram, kept, damping=-1.0)
