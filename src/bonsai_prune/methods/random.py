"""Random structured pruning: the floor every informed method must beat.

Every unit draws a uniform score from a generator seeded by ``config.seed``; the lowest scores
go first until the parameter budget is spent. The raw draw is used, not the per-parameter
score the other baselines use: a uniform draw is already on one scale for every module, and
walking it up removes the same expected fraction of units from every module, heads and
neurons alike, which is what "random" should mean at equal parameter budget.
"""

from __future__ import annotations

import time

import torch

from bonsai_prune.methods.base import (
    METHODS,
    MethodResult,
    PruneContext,
    prune_by_score,
    refuse_resume,
)


@METHODS.register("random")
def random_method(context: PruneContext) -> MethodResult:
    """Remove uniformly random units (seeded) to ``config.sparsity``; needs no data."""
    started = time.perf_counter()
    refuse_resume(context, "random")
    model, adapter, config = context.model, context.adapter, context.config
    generator = torch.Generator().manual_seed(config.seed)
    score = torch.rand(adapter.layout(model).n_units, generator=generator, dtype=torch.float64)
    return prune_by_score(context, score, started, ranking="uniform draw")
