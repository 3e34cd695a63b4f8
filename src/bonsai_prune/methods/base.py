"""What every pruning method shares: its contract, its context, its result, and the
score-driven slicing that takes a model to the target sparsity.

A method is a function ``(context: PruneContext) -> MethodResult`` registered in ``METHODS``.
It prunes ``context.model`` in place, in Bonsai's units (query heads, MLP neurons), to the
same non-embedding parameter budget (``config.sparsity`` of the model as handed in), with the
same per-module floors, so that methods compare at equal size. Bonsai (``methods/bonsai.py``)
is one of them; to add one, write ``methods/<name>.py`` with a function decorated
``@METHODS.register("<name>")`` and import the module in ``methods/__init__.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from bonsai_prune.config import PruneConfig, WorkersConfig
from bonsai_prune.core.budget import (
    check_reachable,
    min_keep_per_module,
    module_multiples,
    prunable_mask,
    selection_costs,
)
from bonsai_prune.core.selection import select_units
from bonsai_prune.data.calibration import CalibrationBatch, batch_maker, build_batch
from bonsai_prune.data.problems import load_gsm8k, load_problems
from bonsai_prune.errors import PruningError
from bonsai_prune.methods.forward import unit_prior
from bonsai_prune.models.adapter import UnitLayout, adapter_for
from bonsai_prune.models.compensation import Compensation, slice_units
from bonsai_prune.registry import Registry
from bonsai_prune.utility import resolve_utility

METHODS: Registry = Registry("method")

MAX_PASSES = 100  # select-and-slice passes before giving up (each pass removes >= 1 unit)


@dataclass
class PruneContext:
    """Everything a method works with, decided before it runs (loading, data, run directory)."""

    model: Any
    tokenizer: Any
    adapter: Any
    config: PruneConfig
    make_batch: Callable[[int], CalibrationBatch]  # round index (1-based) -> its calibration batch
    utility: Callable  # (model, batch) -> float, higher is better; what Bonsai regresses on
    progress: bool = True
    # resume: the (keep mask, figures) of rounds a previous run completed, in order
    completed_rounds: list[tuple[torch.Tensor, dict]] = field(default_factory=list)
    on_round: Callable[[Any], None] | None = None  # called with each finished round (saving)
    # a one-shot method that checkpoints between its steps (FinerCut): what an interrupted run
    # last saved (resume), and the call that saves a JSON-safe state (None: nothing is saved)
    checkpoint: dict | None = None
    on_checkpoint: Callable[[dict], None] | None = None
    workers: WorkersConfig = field(default_factory=WorkersConfig)  # where sub-models are scored
    compensation: Compensation | None = None  # refit before every slice (config.compensate)

    @classmethod
    def create(
        cls,
        model,
        tokenizer,
        config: PruneConfig,
        *,
        pool: list | None = None,
        utility: Callable | None = None,
        progress: bool = True,
        **extra: Any,
    ) -> PruneContext:
        """The context of ``model``: calibration batches from ``pool`` (default: the config's
        data, else GSM8K train), the config's named utility unless ``utility`` is given."""
        if pool is None:
            pool = load_problems(config.data) if config.data else load_gsm8k("train")
        u = config.utility
        make_batch = batch_maker(
            tokenizer,
            pool,
            n=config.calib_samples,
            seed=config.seed,
            prompt=u.prompt,
            shots=u.shots,
            max_length=u.max_length,
            device=next(model.parameters()).device,
        )
        score = utility if utility is not None else resolve_utility(u)
        extra.setdefault("compensation", compensation_for(model, tokenizer, pool, config))
        return cls(
            model, tokenizer, adapter_for(model), config, make_batch, score, progress, **extra
        )


def compensation_for(model, tokenizer, pool: list, config: PruneConfig) -> Compensation | None:
    """The fixed calibration text of ``config.compensate``: the pool's last
    ``compensate_samples`` problems, posed as the utility poses them; None when it is off."""
    if not config.compensate:
        return None
    u = config.utility
    batch = build_batch(
        tokenizer,
        pool[-config.compensate_samples :],
        prompt=u.prompt,
        shots=u.shots,
        max_length=u.max_length,
        device=next(model.parameters()).device,
    )
    return Compensation(batch.input_ids, batch.attention_mask)


@dataclass
class MethodResult:
    """What one method run did: sizes, wall time, its keep masks and method-specific figures."""

    params_before: int
    params_after: int
    sparsity: float  # 1 - params_after / params_before, non-embedding parameters
    seconds: float
    details: dict = field(default_factory=dict)  # JSON-safe
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # (U_step,) bool per step
    rounds: list = field(default_factory=list)  # the rounds run now (iterative methods)
    round_figures: list[dict] = field(default_factory=list)  # every round's figures, replayed too

    @property
    def keep(self) -> torch.Tensor | None:
        """(U,) bool over the units of the model as handed in: the steps' masks composed."""
        if not self.keep_masks:
            return None
        alive = torch.arange(self.keep_masks[0].shape[0])  # original index of each unit left
        for step in self.keep_masks:
            alive = alive[step]
        keep = torch.zeros(self.keep_masks[0].shape[0], dtype=torch.bool)
        keep[alive] = True
        return keep


class Slicing(NamedTuple):
    """What :func:`prune_to_target` removed."""

    keep: torch.Tensor  # (U,) bool over the units of the model as handed in
    n_passes: int  # select-and-slice passes it took


def refuse_resume(context: PruneContext, name: str) -> None:
    """One-shot methods have no rounds to continue."""
    if context.completed_rounds:
        raise PruningError(
            f"--resume applies to iterative methods; {name!r} is one-shot: rerun it with --overwrite"
        )


def relative_importance(
    statistic: torch.Tensor, unit_costs: torch.Tensor, module_index: torch.Tensor
) -> torch.Tensor:
    """Importance per parameter (U,) comparable across modules and unit kinds.

    statistic (U,): a unit's raw importance (>= 0); unit_costs (U,): its parameters;
    module_index (U,): its module. score = (stat / module mean stat) / (cost / module mean cost).

    Why: a raw statistic is only comparable within its module. A head's sums head_dim
    channels where a neuron's has one, and activation scales grow with depth, so ranking raw
    values globally would empty whole kinds or layers for reasons of scale alone. Dividing by
    the module mean keeps what the statistic knows (how a unit compares with its siblings) and
    drops what it does not (how modules compare). To compare modules we assume, absent any
    other knowledge, that a module's importance is proportional to its parameter count; then a
    unit's importance is (stat / module sum) x module params, and per parameter it is the
    score above. Walking this score up to a parameter budget is the greedy knapsack
    (value / weight) that :func:`select_units` implements. It is scale-free (unlike a z-score,
    a dead unit scores 0 in any module) and, within a module of equal costs, it orders units
    exactly as the raw statistic does. A unit scoring 1 is as important per parameter as the
    average unit of its module; modules whose statistic is spread out lose more units.
    """
    n_modules = int(module_index.max()) + 1 if module_index.numel() else 0
    counts = torch.bincount(module_index, minlength=n_modules).double().clamp(min=1)  # (M,)

    def module_mean(values: torch.Tensor) -> torch.Tensor:  # (U,) -> (U,)
        sums = torch.zeros(n_modules, dtype=torch.float64).index_add_(
            0, module_index, values.double()
        )
        return (sums / counts)[module_index]

    stat, cost = statistic.double(), unit_costs.double()
    tiny = torch.finfo(torch.float64).tiny  # an all-zero module scores 0, not NaN
    return (stat / module_mean(stat).clamp(min=tiny)) / (cost / module_mean(cost))


def prune_to_target(
    model,
    adapter,
    config: PruneConfig,
    score: torch.Tensor,
    n_reference: int,
    *,
    allow_empty: bool | None = None,
    compensation: Compensation | None = None,
) -> Slicing:
    """Slice the lowest-scored units until ``config.sparsity`` of ``n_reference`` is removed.

    score (U,): per unit of the current model, higher = keep; +inf = never remove.
    n_reference: the parameter count the target sparsity is measured against.
    allow_empty: per-module floors (default: ``config.allow_empty_modules``).
    compensation: refit before each slice (``models.compensation``).

    A pass selects within the parameters still to remove and slices; selection charges a K/V
    head to its group's last query head (``core.budget.selection_costs``), so a pass frees
    what it counted. When nothing fits any more but the target is still more than ``tolerance`` away,
    the lowest-scored removable unit (or block, with ``--mlp-multiple``) goes as well: the
    target is overshot by under one unit.
    """
    allow_empty = config.allow_empty_modules if allow_empty is None else allow_empty
    n_units = adapter.layout(model).n_units
    alive = torch.arange(n_units)  # (U_now,) original index of each current unit
    score = score.double().clone()
    target_params = (1 - config.sparsity) * n_reference
    n_passes = 0
    while adapter.count_parameters(model) - target_params > config.tolerance * n_reference:
        if n_passes == MAX_PASSES:
            raise PruningError(f"the target was not reached within {MAX_PASSES} passes")
        layout = adapter.layout(model)
        floors = module_floors(adapter, layout, allow_empty)
        remaining = adapter.count_parameters(model) - target_params
        costs, shared = selection_costs(adapter, model)
        keep = select_units(
            score,
            costs,
            remaining,
            layout.module_index,
            floors,
            shared=shared,
            multiple=module_multiples(layout, config.mlp_multiple),
            at_least_one=True,
        ).keep
        if bool(keep.all()):
            raise PruningError(
                "the target sparsity is unreachable with the units and floors allowed; lower "
                "--sparsity, prune both unit kinds, or pass --allow-empty-modules"
            )
        slice_units(adapter, model, keep, compensation)
        alive, score = alive[keep], score[keep]
        n_passes += 1
    final_keep = torch.zeros(n_units, dtype=torch.bool)
    final_keep[alive] = True
    return Slicing(final_keep, n_passes)


def module_floors(adapter, layout: UnitLayout, allow_empty: bool) -> torch.Tensor:
    """LongTensor (M,): ``core.budget.min_keep_per_module``, with the adapter's own word on which
    kinds it can empty when ``allow_empty`` (no-op once the pruner passes ``allow_empty`` on)."""
    floors = min_keep_per_module(adapter, layout, allow_empty)
    if allow_empty:
        can_empty = [adapter.min_units(m.kind, allow_empty=True) for m in layout.modules]
        floors = torch.minimum(floors, torch.tensor(can_empty, dtype=floors.dtype))
    return floors


def protect_unprunable(score: torch.Tensor, layout: UnitLayout, units: str) -> torch.Tensor:
    """``score`` (U,) with +inf on units of kinds the user did not ask to prune."""
    return torch.where(prunable_mask(layout, units), score.double(), math.inf)


@torch.no_grad()
def prior_scores(adapter, model, batch: CalibrationBatch, prior: str, seed: int) -> torch.Tensor:
    """Relative importance (U,) from one of Bonsai's priors (one forward per problem)."""
    statistic = unit_prior(adapter, model, batch, prior, torch.Generator().manual_seed(seed))
    layout = adapter.layout(model)
    return relative_importance(statistic, adapter.unit_costs(model), layout.module_index)


def finish(
    model, adapter, keep: torch.Tensor, n_before: int, started: float, **details
) -> MethodResult:
    """The MethodResult of a method that pruned ``model`` from ``n_before`` parameters."""
    n_after = adapter.count_parameters(model)
    layout = adapter.layout(model)
    details["kept_per_module"] = {m.name: m.n_units for m in layout.modules}
    return MethodResult(
        params_before=n_before,
        params_after=n_after,
        sparsity=1 - n_after / n_before,
        seconds=time.perf_counter() - started,
        details=details,
        keep_masks=[keep],
    )


def prune_by_score(
    context: PruneContext, score: torch.Tensor, started: float, **details
) -> MethodResult:
    """One-shot: protect unprunable kinds, slice ``context.model`` to the target, report."""
    model, adapter, config = context.model, context.adapter, context.config
    n_before = adapter.count_parameters(model)
    check_reachable(adapter, model, config, n_before)
    score = protect_unprunable(score, adapter.layout(model), config.unit_kinds)
    slicing = prune_to_target(
        model, adapter, config, score, n_before, compensation=context.compensation
    )
    return finish(
        model, adapter, slicing.keep, n_before, started, n_passes=slicing.n_passes, **details
    )
