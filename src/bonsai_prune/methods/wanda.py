"""Wanda-style structured pruning: Bonsai's activation-weighted prior alone, no perturbation.

A unit's statistic is mean |input activation| x weight-column norm at its output projection,
summed over its channels (Bonsai's ``wanda`` prior; Sun et al. 2023,
https://arxiv.org/abs/2306.11695, made structured), measured once on the calibration
problems. Units are ranked by importance per parameter relative to their module (see
:func:`bonsai_prune.methods.base.relative_importance`), then the least important go until the
budget is spent. This is Bonsai with its perturbation and regression removed, in one shot:
the gap between the two measures what the forward-only search adds to the prior.
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


@METHODS.register("wanda")
def wanda(context: PruneContext) -> MethodResult:
    """Remove the units with the smallest activation-weighted norm per parameter."""
    started = time.perf_counter()
    refuse_resume(context, "wanda")
    model, adapter, config = context.model, context.adapter, context.config
    batch = context.make_batch(1)
    score = prior_scores(adapter, model, batch, "wanda", config.seed)
    return prune_by_score(context, score, started, ranking="relative wanda")
