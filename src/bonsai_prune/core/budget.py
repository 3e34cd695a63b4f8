"""The parameter budget: which units may go, how many must stay, and when a run is done.

Sparsity is always measured over the *original* non-embedding parameters (embeddings and the
LM head are out of scope, as in Bonsai). A round may remove ``prune_fraction`` of them, clipped
so the last round lands on the target rather than past it; each module keeps a floor of units
so the model still runs.
"""

from __future__ import annotations

import math

import torch

from bonsai_prune.config import PruneConfig
from bonsai_prune.core.selection import SharedCosts
from bonsai_prune.errors import PruningError
from bonsai_prune.models.adapter import NEURONS, UNIT_KINDS, ArchitectureAdapter, UnitLayout


def round_budget(
    n_original: int, n_current: int, target_sparsity: float, prune_fraction: float
) -> float:
    """Parameters to remove this round: f of the original count, clipped at the target.

    ``min(f * n_original, n_current - (1 - p) * n_original)`` and never negative, so the last
    round removes only what is left to reach sparsity p instead of overshooting it.
    """
    left_to_target = n_current - (1.0 - target_sparsity) * n_original
    return max(0.0, min(prune_fraction * n_original, left_to_target))


def target_reached(n_params: int, n_original: int, config: PruneConfig) -> bool:
    return 1 - n_params / n_original >= config.sparsity - config.tolerance


def rounds_left(n_params: int, n_original: int, config: PruneConfig) -> int:
    """Rounds still needed at ``prune_fraction`` of the original parameters each (the last
    may remove less): the total of the progress bar over rounds."""
    missing = config.sparsity - config.tolerance - (1 - n_params / n_original)
    return max(0, math.ceil(round(missing / config.prune_fraction, 9)))


def prunable_mask(layout: UnitLayout, unit_kinds: str) -> torch.Tensor:
    """BoolTensor (U,): units of the kinds the user asked to prune ("both", "heads", ...)."""
    return layout.kind_mask(UNIT_KINDS[unit_kinds])


def min_keep_per_module(
    adapter: ArchitectureAdapter, layout: UnitLayout, allow_empty: bool
) -> torch.Tensor:
    """LongTensor (M,): a module keeps at least one unit unless the user allows emptying it."""
    return torch.tensor(
        [
            max(adapter.min_units(m.kind, allow_empty=allow_empty), 0 if allow_empty else 1)
            for m in layout.modules
        ]
    )


def module_multiples(layout: UnitLayout, mlp_multiple: int) -> torch.Tensor:
    """LongTensor (M,): what each module's kept count stays a multiple of (``--mlp-multiple``
    for MLPs, 1 for attention: a head count has no hardware-friendly shape to keep)."""
    return torch.tensor(
        [mlp_multiple if m.kind == NEURONS else 1 for m in layout.modules], dtype=torch.long
    )


def check_reachable(adapter, model, config: PruneConfig, n_original: int) -> None:
    """Fail before any work if the floors and unit kinds leave the target out of reach."""
    layout = adapter.layout(model)
    costs = adapter.unit_costs(model)
    prunable = prunable_mask(layout, config.unit_kinds)
    floor = min_keep_per_module(adapter, layout, config.allow_empty_modules)
    removable = 0.0
    for (module, cost), keep_n in zip(layout.split(costs), floor.tolist(), strict=True):
        if bool(prunable[module.units].all()):
            # the cheapest units may stay; this is an upper bound, which is what we need
            removable += float(cost.sort(descending=True).values[: module.n_units - keep_n].sum())
    reachable = removable / n_original
    if reachable + 1e-9 < config.sparsity - config.tolerance:
        raise PruningError(
            f"target sparsity {config.sparsity} is unreachable: pruning {config.unit_kinds} with the "
            f"per-module floors removes at most {reachable:.3f}; lower --sparsity, prune both "
            "unit kinds, or pass --allow-empty-modules"
        )


def selection_costs(adapter, model) -> tuple[torch.Tensor, SharedCosts | None]:
    """What :func:`select_units` charges: exact costs with shared groups where the adapter
    knows them (K/V heads freed with their group's last query head), else even shares."""
    if hasattr(adapter, "shared_costs"):
        return adapter.shared_costs(model)
    return adapter.unit_costs(model), None
