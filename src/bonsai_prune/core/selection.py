"""Choosing what to remove: the least important units, within a parameter budget.

Units are walked from the lowest importance up; each is removed if its module stays at or
above its floor and its parameters fit in what is left of the round's budget, and skipped
otherwise (a cheaper, slightly more important unit may still fit). Units scored +inf (fixed
this round, or of a kind the user does not prune) are never removed. Where a module's width
must stay a multiple of N (``multiple``), its units go in blocks of N instead: its least
important N, then the next N, each block walked at its members' mean importance.

Paper: Dery et al., "Everybody Prune Now", https://arxiv.org/abs/2402.05406 (section 3.2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SharedCosts(NamedTuple):
    """Parameters several units share, freed only when the last of them goes.

    A grouped-query attention layer's K/V head serves a group of query heads: removing one
    query head frees its q rows and o columns, and the K/V rows only with the group's last
    head. Charging each head an even share of the K/V instead over-counts what a partly
    removed group frees, and the run ends short of its budget (then needs a mop-up round).
    """

    group: torch.Tensor  # (U,) long: the shared group of each unit, -1 for none
    cost: torch.Tensor  # (G,) parameters freed when every unit of group g is removed


class Selection(NamedTuple):
    """The units a round keeps and the parameters their removal frees."""

    keep: torch.Tensor  # (U,) bool keep mask, True = kept
    removed_params: float  # sum of the costs of the units removed by this selection


def select_units(
    score: torch.Tensor,
    unit_costs: torch.Tensor,
    budget: float,
    module_index: torch.Tensor,
    min_keep: torch.Tensor,
    current_keep: torch.Tensor | None = None,
    shared: SharedCosts | None = None,
    tiebreak: torch.Tensor | None = None,
    multiple: torch.Tensor | None = None,
    at_least_one: bool = False,
) -> Selection:
    """Keep mask (U,) that removes the least important units until ``budget`` is spent.

    score (U,): importance, higher = keep; +inf = never remove; ties go to the lower index.
    unit_costs (U,): parameters removing each unit frees (>= 0). budget: parameters to remove.
    module_index (U,) long: each unit's module in [0, M). min_keep (M,) long: fewest units each
    module keeps (1, or 0 where emptying a module is allowed).
    current_keep (U,) bool, optional: units already removed (False) stay removed, do not count
    towards their module's floor, and are not charged to the budget again.
    shared, optional: parameters groups of units share (K/V heads). Then ``unit_costs`` are
    the units' own parameters, and removing the last kept unit of a group also frees (and is
    charged) the group's cost, so ``removed_params`` is exactly what slicing frees.
    tiebreak (U,), optional: orders units whose scores tie, lowest first (e.g. each unit's prior
    rank within its module, ``utility.validity.prior_tiebreak``), so that equal betas (all of
    them when a round has no signal) are not removed by unit position; ties left go to the
    lower index.
    multiple (M,) long, optional: each module's kept count stays a multiple of it (1: any
    count); see :func:`unit_blocks`. Units of a shared group must be in modules of multiple 1.
    at_least_one: when nothing fits the budget, remove the least important removable unit (or
    block) anyway, so a pass always progresses: the budget is overshot by under one unit.

    Greedy, as in Bonsai: a unit that does not fit is skipped and the walk goes on; it ends
    when what is left of the budget is below the cost of every unit still ahead.
    """
    n_units = score.shape[0]
    if not (score.shape == unit_costs.shape == module_index.shape) or score.dim() != 1:
        raise ValueError(
            "score, unit_costs and module_index must all be (U,), got "
            f"{tuple(score.shape)}, {tuple(unit_costs.shape)}, {tuple(module_index.shape)}"
        )
    score, costs = score.detach().cpu().double(), unit_costs.detach().cpu().double()
    module_index, min_keep = module_index.cpu(), min_keep.cpu()
    if bool(torch.isnan(score).any()):
        raise ValueError("score has NaN entries; give units that must stay +inf")
    if math.isnan(budget) or bool(torch.isnan(costs).any()):
        raise ValueError("budget and unit_costs must not be NaN")
    if bool((costs < 0).any()):
        raise ValueError("unit_costs must be >= 0")
    if n_units and int(module_index.max()) >= min_keep.numel():
        raise ValueError(
            f"module_index reaches {int(module_index.max())} but min_keep has only "
            f"{min_keep.numel()} modules"
        )
    if multiple is not None and (multiple.shape != min_keep.shape or bool((multiple < 1).any())):
        raise ValueError(
            f"multiple must be (M,) = {tuple(min_keep.shape)} of integers >= 1, got {multiple.tolist()}"
        )
    keep = torch.ones(n_units, dtype=torch.bool)
    if current_keep is not None:
        keep = current_keep.detach().cpu().bool().clone()
    if multiple is not None and bool((multiple.cpu() > 1).any()):
        return _select_blocks(
            score,
            costs,
            budget,
            module_index,
            min_keep,
            keep,
            shared,
            tiebreak,
            multiple,
            at_least_one,
        )
    # (M,) units each module still has
    kept_in_module = torch.bincount(module_index[keep], minlength=min_keep.numel()).tolist()
    floor = min_keep.tolist()

    order = walk_order(score, tiebreak)  # (U,) least important first
    order = order[(score[order] != float("inf")) & keep[order]]  # (R,) removable, in order
    # (R,) cheapest cost from each position on: once the budget left is below it, stop
    cheapest_ahead = costs[order].flip(0).cummin(0).values.flip(0).tolist()
    unit_cost = costs.tolist()
    unit_module = module_index.tolist()
    if shared is not None:
        unit_group = shared.group.cpu().tolist()
        group_cost = shared.cost.detach().cpu().double().tolist()
        in_group = shared.group.cpu()[keep & (shared.group.cpu() >= 0)]
        kept_in_group = torch.bincount(in_group, minlength=len(group_cost)).tolist()
    left, removed, n_removed = float(budget), 0.0, 0
    for position, unit in enumerate(order.tolist()):
        if left < cheapest_ahead[position]:
            break
        module = unit_module[unit]
        cost = unit_cost[unit]
        group = unit_group[unit] if shared is not None else -1
        if group >= 0 and kept_in_group[group] == 1:
            cost += group_cost[group]  # the group's last unit frees what they share
        if cost > left or kept_in_module[module] <= floor[module]:
            continue
        keep[unit] = False
        kept_in_module[module] -= 1
        if group >= 0:
            kept_in_group[group] -= 1
        left -= cost
        removed += cost
        n_removed += 1
    if at_least_one and n_removed == 0:
        for unit in order.tolist():  # least important first
            if kept_in_module[unit_module[unit]] > floor[unit_module[unit]]:
                keep[unit] = False
                group = unit_group[unit] if shared is not None else -1
                shared_cost = group_cost[group] if group >= 0 and kept_in_group[group] == 1 else 0
                removed = unit_cost[unit] + shared_cost
                break
    return Selection(keep, removed)


def walk_order(score: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """(U,) long: units least important first; ties by ``tiebreak``, then the lower index."""
    order = torch.arange(score.shape[0])
    if tiebreak is not None:
        order = torch.sort(tiebreak.detach().cpu().double(), stable=True).indices
    return order[torch.sort(score[order], stable=True).indices]


def unit_blocks(
    score: torch.Tensor,
    module_index: torch.Tensor,
    multiple: torch.Tensor,
    keep: torch.Tensor,
    tiebreak: torch.Tensor | None = None,
) -> torch.Tensor:
    """(U,) long: the block of each kept unit, -1 for units already removed.

    In a module of multiple N > 1, its kept units in the walk's order (least important first:
    score, then tiebreak, then index) form blocks: the first holds k mod N of its k units (N
    when that is 0), every other block N, so removing its lowest b blocks leaves a multiple of
    N. A unit of a module of multiple 1 is a block of its own. Blocks are numbered module by
    module, each module's in its walk order, so ties between blocks fall as they did between
    units.
    """
    score, module_index = score.detach().cpu().double(), module_index.cpu()
    keep, multiple = keep.detach().cpu().bool(), multiple.cpu()
    order = walk_order(score, tiebreak)
    order = order[keep[order]]
    order = order[torch.sort(module_index[order], stable=True).indices]  # by module, walk order
    block = torch.full((score.shape[0],), -1, dtype=torch.long)
    counts = torch.bincount(module_index[order], minlength=multiple.numel()).tolist()
    start = next_block = 0
    for module, count in enumerate(counts):
        if count == 0:
            continue
        n = int(multiple[module])
        position = torch.arange(count)
        first = count % n or n
        ids = position if n <= 1 else torch.where(position < first, 0, 1 + (position - first) // n)
        block[order[start : start + count]] = next_block + ids
        start += count
        next_block += int(ids[-1]) + 1
    return block


def _select_blocks(
    score: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    module_index: torch.Tensor,
    min_keep: torch.Tensor,
    keep: torch.Tensor,
    shared: SharedCosts | None,
    tiebreak: torch.Tensor | None,
    multiple: torch.Tensor,
    at_least_one: bool,
) -> Selection:
    """``select_units`` over :func:`unit_blocks`: a block scores its members' mean (the walk
    reaches it where it would have reached its average member), costs their sum, and a module
    keeps as many blocks as it takes to keep ``min_keep`` units."""
    block = unit_blocks(score, module_index, multiple, keep, tiebreak)  # (U,)
    alive = block >= 0
    members = block[alive]  # (K,) block of each kept unit
    n_blocks = int(members.max()) + 1 if members.numel() else 0
    size = torch.bincount(members, minlength=n_blocks).double()  # (B,)

    def block_sum(values: torch.Tensor) -> torch.Tensor:  # (U,) -> (B,)
        return torch.zeros(n_blocks, dtype=torch.float64).index_add_(
            0, members, values[alive].double()
        )

    finite = torch.isfinite(score)
    block_score = block_sum(torch.where(finite, score, 0.0)) / size
    block_score[block_sum((~finite).double()) > 0] = math.inf  # a fixed member fixes its block
    block_module = torch.zeros(n_blocks, dtype=torch.long).index_put_(
        (members,), module_index[alive]
    )
    block_floor = torch.zeros_like(min_keep)
    for module, floor in enumerate(min_keep.tolist()):
        sizes = size[block_module == module].flip(0)  # (b,) its blocks, most important first
        if floor > 0 and sizes.numel():
            block_floor[module] = min(int((sizes.cumsum(0) < floor).sum()) + 1, sizes.numel())
    block_shared = None
    if shared is not None:
        group = shared.group.cpu()[alive]  # (K,)
        grouped = group >= 0
        if bool((size[members[grouped]] > 1).any()):
            raise ValueError("units of a shared group must be in modules of multiple 1")
        block_group = torch.full((n_blocks,), -1, dtype=torch.long)
        block_group[members[grouped]] = group[grouped]
        block_shared = SharedCosts(block_group, shared.cost)
    selection = select_units(
        block_score,
        block_sum(costs),
        budget,
        block_module,
        block_floor,
        shared=block_shared,
        tiebreak=None if tiebreak is None else block_sum(tiebreak.cpu()) / size,
        at_least_one=at_least_one,
    )
    keep = keep.clone()
    keep[alive] = selection.keep[members]
    return Selection(keep, selection.removed_params)
