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


def removal_errors(
    weight: torch.Tensor, gram: torch.Tensor, width: int, damping: float = 0.01
) -> torch.Tensor:
    """Output error (n,) of removing each unit of ``weight`` (out, n * width) alone, the other
    input channels refitted by least squares: Optimal Brain Surgeon, one block per unit.

    With H = G + lambda I (the ridge of :func:`refit_kept_columns`, here over all channels),
    removing the channels S of one unit and refitting the rest leaves
    ``tr(W_S (H^-1)_SS^-1 W_S^T)`` of squared error summed over the calibration tokens: what
    compensation cannot make up for. A neuron (width 1) gives ``||w_u||^2 / (H^-1)_uu``.
    Computed in float64. References: Hassibi & Stork 1993; Kurtic et al., ZipLM, 2023.
    """
    out, channels = weight.shape
    if gram.shape != (channels, channels) or channels % width:
        raise ValueError(
            f"weight {tuple(weight.shape)} needs a ({channels}, {channels}) gram and a width "
            f"dividing {channels}, got {tuple(gram.shape)} and {width}"
        )
    n = channels // width
    g = gram.to(weight.device, torch.float64)
    eye = torch.eye(channels, dtype=torch.float64, device=g.device)
    h_inv = torch.linalg.inv(g + damping * g.diagonal().mean() * eye)
    blocks = h_inv.view(n, width, n, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n,w,w)
    w = weight.double().view(out, n, width).permute(1, 2, 0)  # (n, width, out): W_S^T
    return (w * torch.linalg.solve(blocks, w)).sum((1, 2))  # tr(W_S B^-1 W_S^T) per unit
