"""Priors: a cheap per-unit importance guess that decides which units Bonsai perturbs.

A round first ranks the units of each module by a prior computed from one forward pass (or
from nothing at all). The top ``1 - 2f`` of each module are *fixed*: kept in every sampled
sub-model and never removed this round, so the forward-pass budget is spent on the units that
could plausibly go. The sampler then removes the remaining *candidates* with probability
growing as their prior shrinks. Higher prior = more important throughout.

Paper: Dery et al., "Everybody Prune Now", https://arxiv.org/abs/2402.05406 (section 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bonsai_prune.models.adapter import (
    UnitStats,  # re-exported: defined by the adapter contract
)
from bonsai_prune.registry import Registry

__all__ = ["PRIORS", "Prior", "UnitStats", "fixed_units", "units_to_remove"]

Prior = Callable[[UnitStats, torch.Generator], torch.Tensor]
PRIORS: Registry[Prior] = Registry("prior")


@PRIORS.register("wanda")
def wanda_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """Activation-weighted weight norm (U,), Bonsai's default: sees what the data uses."""
    return stats.wanda.double()


@PRIORS.register("magnitude")
def magnitude_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """Weight norm (U,): data-free, so it cannot tell a large unit that is never active."""
    return stats.weight_norm.double()


@PRIORS.register("random")
def random_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise (U,) in [0, 1): an ablation that fixes and weights units at random."""
    return torch.rand(
        stats.wanda.shape, generator=generator, dtype=torch.float64, device=generator.device
    )


@PRIORS.register("uniform")
def uniform_prior(stats: UnitStats, generator: torch.Generator) -> torch.Tensor:
    """All ones (U,): no knowledge, so candidates are sampled uniformly (ties fix by index)."""
    return torch.ones(stats.wanda.shape, dtype=torch.float64)


def round_half_up(x: float) -> int:
    """``round`` without banker's rounding: 0.5 -> 1, 2.5 -> 3 (Python's gives 0 and 2)."""
    return math.floor(x + 0.5 + 1e-9)  # 0.35 * 90 is 31.499999999999996 in floating point


def units_to_remove(n_units: int, sample_fraction: float) -> int:
    """Units a sampled mask removes from a module of ``n_units`` (before capping by candidates)."""
    return round_half_up(sample_fraction * n_units)


def fixed_units(
    prior: torch.Tensor, module_index: torch.Tensor, sample_fraction: float
) -> torch.Tensor:
    """Fixed-unit mask (U,) bool, True = fixed: each module's top ``ceil((1 - 2f) * n)`` by prior.

    prior (U,): higher = more important; module_index (U,) long: each unit's module;
    sample_fraction: f, the fraction of each module a sampled mask removes, in [0, 1].

    The fixed count is lowered where needed so that every module keeps at least
    ``2 * round(f * n)`` candidates (all of them when that exceeds n): then both masks of an
    antithetic pair remove about ``round(f * n)`` units. With f = 0 everything is fixed, with
    f >= 0.5 nothing is.
    Ties in the prior go to the lower index (a stable sort), so the set is deterministic.
    """
    if not 0.0 <= sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in [0, 1], got {sample_fraction}")
    if prior.shape != module_index.shape or prior.dim() != 1:
        raise ValueError(
            f"prior and module_index must be (U,) alike, got {tuple(prior.shape)} "
            f"and {tuple(module_index.shape)}"
        )
    prior, module_index = prior.detach().cpu(), module_index.cpu()
    if not bool(torch.isfinite(prior).all()):
        raise ValueError("prior has non-finite entries; a statistic overflowed or is missing")
    n_fixed = [
        fixed_count(n, sample_fraction) for n in torch.bincount(module_index).tolist()
    ]  # (M,) per module
    # units grouped by module, each group in descending prior; stable sorts: ties by index
    order = torch.sort(prior, descending=True, stable=True).indices  # (U,)
    order = order[torch.sort(module_index[order], stable=True).indices]  # (U,)
    sorted_module = module_index[order]  # (U,) non-decreasing
    group_start = torch.searchsorted(sorted_module, sorted_module, right=False)  # (U,)
    rank = torch.arange(prior.numel()) - group_start  # (U,) 0 = module's top unit
    fixed = torch.zeros(prior.shape, dtype=torch.bool)
    fixed[order] = rank < torch.tensor(n_fixed, dtype=torch.long)[sorted_module]
    return fixed


def fixed_count(n_units: int, sample_fraction: float) -> int:
    """Fixed units in a module of ``n_units``: ceil((1 - 2f) n), leaving 2 round(f n) free."""
    # the small tolerance stops 0.8 * 30 = 24.000000000000004 from fixing 25 units
    n_fixed = max(0, math.ceil((1 - 2 * sample_fraction) * n_units - 1e-9))
    return min(n_fixed, n_units - min(n_units, 2 * units_to_remove(n_units, sample_fraction)))
