"""Optimal Brain Surgeon, structured: remove the units whose loss compensation cannot make up.

Every head and neuron is scored by the squared output error its removal leaves once the kept
input channels of its output projection are refitted by least squares
(``core.compensation.removal_errors``), from the Gram matrix of that projection's inputs on the
calibration problems: one forward pass, no sub-model scored. Scores are ranked per parameter
relative to their module, as wanda's are (``methods.base.relative_importance``), and the slice
is compensated as every method's is. Wanda asks how much a unit writes; this asks how much of
what it writes the others cannot write instead, the question compensation makes the right one.
Hassibi & Stork 1993; structured as in ZipLM (Kurtic et al. 2023), one shot here.
"""

from __future__ import annotations

import time

import torch

from bonsai_prune.core.compensation import removal_errors
from bonsai_prune.methods.base import (
    METHODS,
    MethodResult,
    PruneContext,
    prune_by_score,
    refuse_resume,
    relative_importance,
)
from bonsai_prune.models.compensation import DAMPING, Compensation, each_input_gram


@torch.no_grad()
def obs_errors(adapter, model, text: Compensation) -> torch.Tensor:
    """Removal error (U,) of every unit alone, in the layout's unit order (0 where a module
    is empty: nothing to remove)."""
    projections = adapter.output_projections(model)
    modules = adapter.layout(model).modules
    live = {(m.layer, m.kind) for m in modules if m.n_units} & projections.keys()
    targets = {key: projections[key][0] for key in live}
    errors = {
        key: removal_errors(projections[key][0].weight, gram, projections[key][1], DAMPING).cpu()
        for key, gram in each_input_gram(model, targets, text)  # a few layers' at a time
    }
    return torch.cat(
        [
            errors.get((m.layer, m.kind), torch.zeros(m.n_units, dtype=torch.float64))
            for m in modules
        ]
    )


@METHODS.register("obs")
def obs(context: PruneContext) -> MethodResult:
    """Remove the units with the least uncompensable output error per parameter."""
    started = time.perf_counter()
    refuse_resume(context, "obs")
    model, adapter = context.model, context.adapter
    batch = context.make_batch(1)
    errors = obs_errors(adapter, model, Compensation(batch.input_ids, batch.attention_mask))
    layout = adapter.layout(model)
    score = relative_importance(errors, adapter.unit_costs(model), layout.module_index)
    return prune_by_score(context, score, started, ranking="relative OBS error")
