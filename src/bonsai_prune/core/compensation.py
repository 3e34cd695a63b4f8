"""Refitting a projection when some of its input channels are removed: least squares on the
inputs' Gram matrix, forward passes only.

Removing heads or neurons drops input channels of ``o_proj`` / ``down_proj`` and, with them,
what those channels wrote to the residual stream. Given G = X^T X of the projection's inputs
on calibration text, the kept columns can absorb the removed ones' contribution in the
least-squares sense (``min ||X_K W_K'^T - X W^T||``):

    W_K' = W_K + (solve(G_KK + lambda I, G_KR W_R^T))^T,   lambda = damping * mean(diag G_KK)

The ridge term keeps the solve stable where kept channels are nearly collinear or calibration
tokens are few. Where the Gram matrices come from and when the refit runs:
``models/compensation.py``.
"""

from __future__ import annotations

import torch


def refit_kept_columns(
    weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = 0.01
) -> torch.Tensor:
    """``weight`` (out, C) with its kept columns refitted to also write what the removed ones
    wrote on the inputs ``gram`` (C, C) summarises; ``kept`` (C,) bool. The removed columns
    are returned unchanged (slicing drops them). Computed in float64, returned in
    ``weight``'s dtype. Nothing to refit (all kept or none kept): ``weight`` as it is."""
    if gram.shape != (weight.shape[1], weight.shape[1]) or kept.shape != (weight.shape[1],):
        raise ValueError(
            f"weight {tuple(weight.shape)} needs a ({weight.shape[1]}, {weight.shape[1]}) gram "
            f"and ({weight.shape[1]},) kept, got {tuple(gram.shape)} and {tuple(kept.shape)}"
        )
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    kept = kept.bool()
    if bool(kept.all()) or not bool(kept.any()):
        return weight
    k, r = kept.nonzero()[:, 0], (~kept).nonzero()[:, 0]
    w, g = weight.double().clone(), gram.to(weight.device, torch.float64)
    g_kk = g[k][:, k]
    eye = torch.eye(len(k), dtype=torch.float64, device=g.device)
    ridge = damping * g_kk.diagonal().mean() * eye
    w[:, k] += torch.linalg.solve(g_kk + ridge, g[k][:, r] @ w[:, r].T).T
    return w.to(weight.dtype)
