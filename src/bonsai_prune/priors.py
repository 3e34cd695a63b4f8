"""Priors: a cheap per-unit importance guess that decides which units Bonsai perturbs.

The top ``1 - 2f`` units of each module by the prior are fixed (kept, never sampled) in a
round; the rest are candidates, removed by the sampler with probability growing as the prior
shrinks. Paper: https://arxiv.org/abs/2402.05406 (section 3.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import Registry


@dataclass(frozen=True)
class UnitStats:
    """Per-unit statistics recorded by the adapter in one forward pass over calibration data."""

    wanda: (
        torch.Tensor
    )  # (U,) sum over the unit's channels of mean|activation| x weight-column norm
    weight_norm: torch.Tensor  # (U,) L2 norm of all the unit's weights


PRIORS: Registry = Registry("prior")


@PRIORS.register("wanda")
def wanda_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """Activation-weighted magnitude (Bonsai's default)."""
    return stats.wanda.double()


@PRIORS.register("magnitude")
def magnitude_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    return stats.weight_norm.double()


@PRIORS.register("random")
def random_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(stats.wanda.shape, generator=generator, dtype=torch.float64)


@PRIORS.register("uniform")
def uniform_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """No prior knowledge: nothing fixed is preferred, sampling is uniform among candidates."""
    return torch.ones(stats.wanda.shape, dtype=torch.float64)


def fixed_units(
    prior: torch.Tensor, module_index: torch.Tensor, prune_fraction: float
) -> torch.Tensor:
    """BoolTensor (U,): per module, the top ``1 - 2f`` units by prior (ties: lower index first).

    At least ``round(f * n)`` units of each module stay candidates, so a mask can always
    remove the round's fraction and its antithetic complement can too.
    """
    fixed = torch.zeros_like(prior, dtype=torch.bool)
    for module in torch.unique(module_index).tolist():
        units = torch.nonzero(module_index == module).flatten()  # (n,)
        n = len(units)
        n_candidates = max(
            n - math.ceil((1 - 2 * prune_fraction) * n), 2 * round(prune_fraction * n)
        )
        n_fixed = max(0, n - min(n, n_candidates))
        if n_fixed == 0:
            continue
        # stable descending sort: equal priors keep index order, so ties are deterministic
        order = torch.sort(prior[units], descending=True, stable=True).indices
        fixed[units[order[:n_fixed]]] = True
    return fixed
