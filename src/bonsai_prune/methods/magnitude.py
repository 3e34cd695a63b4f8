"""Magnitude structured pruning: remove the units whose weights are smallest.

A unit's statistic is the L2 norm of all its weights (Bonsai's ``magnitude`` prior: a head's q
rows and o columns, a neuron's gate and up rows and down column), measured once on the model
as handed in. Units are ranked by importance per parameter relative to their module (see
:func:`bonsai_prune.methods.base.relative_importance`): a head's norm sums 4 x head_dim x
hidden weights, a neuron's 3 x hidden, and layers differ in scale, so raw norms are not
comparable across modules. One shot: no re-scoring after slicing.
"""

from __future__ import annotations

import time

from bonsai_prune.methods.base import (
    METHODS,
    MethodResult,
    PruneContext,
    prior_scores,
    prune_by_score,
    refuse_resume,
)


@METHODS.register("magnitude")
def magnitude(context: PruneContext) -> MethodResult:
    """Remove the units with the smallest weight norm per parameter to ``config.sparsity``."""
    started = time.perf_counter()
    refuse_resume(context, "magnitude")
    model, adapter, config = context.model, context.adapter, context.config
    # the statistics collector runs a forward; the weight norms do not depend on it
    batch = context.make_batch(1)
    score = prior_scores(adapter, model, batch, "magnitude", config.seed)
    return prune_by_score(context, score, started, ranking="relative weight norm")
