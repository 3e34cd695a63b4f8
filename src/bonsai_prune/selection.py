"""Choosing what to remove: the least important units, within a parameter budget.

Units are walked from the lowest importance up; each is removed if its module keeps its floor
and its parameters fit in what is left of the budget. Paper: https://arxiv.org/abs/2402.05406
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Selection(NamedTuple):
    keep: torch.Tensor  # (U,) bool
    removed_params: float


def round_budget(
    n_original: int, n_current: int, target_sparsity: float, prune_fraction: float
) -> float:
    """Parameters to remove this round: f of the original, clipped so the target is not overshot."""
    remaining_to_target = n_current - (1 - target_sparsity) * n_original
    return max(0.0, min(prune_fraction * n_original, remaining_to_target))


def select_units(
    score: torch.Tensor,
    unit_costs: torch.Tensor,
    budget: float,
    module_index: torch.Tensor,
    min_keep: torch.Tensor,
) -> Selection:
    """Keep mask (U,) removing low-score units until ``budget`` parameters are freed.

    score (U,): importance, +inf for units that must stay; unit_costs (U,): parameters each
    frees; min_keep (M,): fewest units each module keeps.
    """
    keep = torch.ones(score.shape[0], dtype=torch.bool)
    kept_in_module = torch.bincount(module_index, minlength=len(min_keep)).tolist()
    floor = min_keep.tolist()
    costs = unit_costs.double().tolist()
    modules = module_index.tolist()
    removable = [
        i for i in torch.sort(score, stable=True).indices.tolist() if math.isfinite(score[i])
    ]
    cheapest = min((costs[i] for i in removable), default=math.inf)
    left = float(budget)
    for unit in removable:
        if left < cheapest:
            break
        module = modules[unit]
        if costs[unit] > left or kept_in_module[module] <= floor[module]:
            continue
        keep[unit] = False
        kept_in_module[module] -= 1
        left -= costs[unit]
    return Selection(keep, float(budget) - left)
