"""Sampling sub-models: antithetic pairs of keep masks over the round's candidate units.

Each mask removes ``round(f * n)`` units of every module, drawn without replacement from the
module's candidates with probability proportional to ``max(prior) - prior`` (plus a small
floor so that every candidate can be drawn). Its partner removes exactly the candidates it
kept: the pair covers every candidate once, which halves the variance of the regression's
estimate for the same number of evaluations. Paper: https://arxiv.org/abs/2402.05406
"""

from __future__ import annotations

import torch

EPSILON = 1e-6  # relative floor on the sampling weight


def removal_weights(prior: torch.Tensor) -> torch.Tensor:
    """Sampling weights (n,) for candidates with prior (n,): low prior, high weight."""
    gap = prior.max() - prior  # (n,)
    return gap + EPSILON * (gap.max() + 1.0)


def sample_masks(
    prior: torch.Tensor,
    fixed: torch.Tensor,
    module_index: torch.Tensor,
    prune_fraction: float,
    n_pairs: int,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Keep masks (2 * n_pairs, U), True = keep; rows 2i and 2i+1 are an antithetic pair.

    Fixed units are kept in every mask. Modules with no candidates are untouched.
    """
    n_units = prior.shape[0]
    masks = torch.ones((2 * n_pairs, n_units), dtype=torch.bool)
    modules = []
    for module in torch.unique(module_index).tolist():
        units = torch.nonzero(module_index == module).flatten()
        candidates = units[~fixed[units]]  # (c,)
        k = min(round(prune_fraction * len(units)), len(candidates))
        if k > 0:
            modules.append((candidates, k, removal_weights(prior[candidates].double())))
    for pair in range(n_pairs):
        for candidates, k, weights in modules:
            removed = candidates[
                torch.multinomial(weights, k, replacement=False, generator=generator)
            ]
            masks[2 * pair, removed] = False
            complement = masks[2 * pair, candidates]  # candidates the first mask kept
            masks[2 * pair + 1, candidates] = ~complement
    return masks
