"""FinerCut: greedy removal of whole attention and MLP sub-layers (Zhang et al. 2024,
https://arxiv.org/abs/2405.18218), in Bonsai's units and parameter budget.

Candidates are the attention sub-layers (all query heads of a layer) and the MLP sub-layers
(all neurons of a layer) of the kinds ``config.unit_kinds`` allows. Each step removes, virtually
(``adapter.apply_masks`` with the removals so far plus the candidate), every remaining
candidate in turn and measures how far the model's next-token distributions move on the
calibration solution positions (``batch.target_mask``); the candidate that moves them least
goes. As in the paper's code, the reference is the unpruned model's output, computed once,
and the distance is the Jensen-Shannon divergence: symmetric and bounded by ln 2, so a
sub-model whose logits are not finite simply scores +inf and is never chosen.

Budget. The paper counts layers; here, as for every method, the budget is ``config.sparsity``
of the non-embedding parameters. When the sub-layer the greedy picks next costs more than is
left, it is thinned instead of removed: its units go by wanda score (measured on the model
with the earlier removals sliced), lowest first, until the budget is spent. The greedy order
is kept (the thinned sub-layer is the one FinerCut would have cut next) and the result lands
on the same target as the other methods; the report names the thinned sub-layer.

Whole sub-layers are this method's unit, so it empties modules whatever
``config.allow_empty_modules`` says (an empty attention becomes the adapter's stand-in that
adds nothing to the residual stream). Cost: one forward of the calibration batch per
remaining candidate per step, about n_steps x n_sub-layers forwards, each with the LM head
applied at the solution positions only; a candidate's forward starts at its own layer from
the inputs recorded once per step (:class:`LayerInputs`), about half a forward on average.
The slowest method here, so each removal is checkpointed in the run directory and ``--resume``
continues after the last one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from bonsai_prune.config import PruneConfig
from bonsai_prune.core.row_blocks import by_row_blocks
from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.errors import PruningError, RunDirectoryError
from bonsai_prune.methods.base import (
    METHODS,
    MethodResult,
    PruneContext,
    finish,
    prior_scores,
    prune_to_target,
)
from bonsai_prune.models.adapter import HEADS, NEURONS, ModuleUnits
from bonsai_prune.models.compensation import slice_units

ROWS_PER_FORWARD = 4  # rows of similar length per forward, cut to the longest (less padding)
POSITIONS_PER_CHUNK = 256  # LM-head rows at a time: 256 x vocab floats per log-prob chunk


class Removals(NamedTuple):
    """What the greedy search decided, on the units of the model as handed in."""

    keep: torch.Tensor  # (U,) bool: False for the units of every removed sub-layer
    steps: list[dict]  # one {"module", "js", "params"} per removed sub-layer, in order
    next_sublayer: ModuleUnits | None  # the greedy's next pick, too big for what is left


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (n,) in nats between rows of log-probabilities (n, V), a
    block of rows at a time (:mod:`bonsai_prune.core.row_blocks`)."""
    return by_row_blocks(_row_js, log_p, log_q)


def _row_js(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)  # (n, V) log of the midpoint
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # (n,)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


@torch.no_grad()
def target_hidden(
    model, batch: CalibrationBatch, start: LayerInputs | None = None, layer: int = 0
) -> torch.Tensor:
    """Final hidden states (n_target, H) at the positions that predict solution tokens, the
    rows taken longest first (every call the same order).

    Rows run in chunks of similar length, each cut to its longest row: a third of a padded
    GSM8K calibration batch is padding (8 problems: 2,560 positions for 1,707 tokens; in
    chunks of 4, 1,992). Right padding assumed, as the calibration batches have it.
    start, layer: begin at decoder layer ``layer`` from ``start``'s recorded inputs (the
    layers below pass their input through): the same numbers as a whole forward when nothing
    below ``layer`` differs from what ``start`` recorded, for a fraction of its cost."""
    decoder = model.get_decoder()
    lengths = batch.attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    hidden = []
    for chunk, first in enumerate(range(0, len(order), ROWS_PER_FORWARD)):
        rows = order[first : first + ROWS_PER_FORWARD]
        width = int(lengths[rows].max())
        skip = nullcontext() if start is None else start.begin_at(layer, chunk)
        with skip:
            out = decoder(
                input_ids=batch.input_ids[rows, :width],
                attention_mask=batch.attention_mask[rows, :width],
                use_cache=False,
            ).last_hidden_state  # (b, width, H)
        hidden.append(out[batch.target_mask[rows, :width]])
    return torch.cat(hidden)


class LayerInputs:
    """Each decoder layer's input hidden states, per row chunk of the calibration batch, under
    the removals made so far (``record``).

    A candidate sub-layer in layer i changes nothing below layer i, so its trial forward can
    start there (:meth:`begin_at`): on average half a forward instead of a whole one. The
    greedy checks once that a started forward gives exactly the whole forward's divergence,
    and uses whole forwards if not (a family whose layers call differently)."""

    def __init__(self, layers, inputs: list[list[torch.Tensor]], returns_tuple: bool) -> None:
        self.layers, self.inputs, self.returns_tuple = layers, inputs, returns_tuple

    @classmethod
    @torch.no_grad()
    def record(cls, model, adapter, batch: CalibrationBatch, keep: torch.Tensor) -> LayerInputs:
        layers = adapter._layers(model)
        inputs: list[list[torch.Tensor]] = []  # one list per row chunk of target_hidden's
        outputs: list[object] = []

        def keep_input(module, args, kwargs):
            if module is layers[0]:  # a new row chunk's forward begins
                inputs.append([])
            inputs[-1].append(args[0] if args else kwargs["hidden_states"])

        handles = [
            layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in layers
        ]
        handles.append(layers[-1].register_forward_hook(lambda m, a, out: outputs.append(out)))
        try:
            with adapter.apply_masks(model, keep):
                target_hidden(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return cls(layers, inputs, isinstance(outputs[0], tuple))

    @contextmanager
    def begin_at(self, layer: int, chunk: int) -> Iterator[None]:
        """Inside: a forward of row chunk ``chunk`` runs layers ``layer``.. only."""
        if layer == 0:
            yield
            return
        recorded = self.inputs[chunk][layer]

        def passthrough(hidden_states, *args, **kwargs):
            return (hidden_states,) if self.returns_tuple else hidden_states

        def recorded_input(module, args, kwargs):
            if args:
                return (recorded, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": recorded}

        below = self.layers[:layer]
        for module in below:
            module.forward = passthrough  # an instance attribute: the class's is untouched
        handle = self.layers[layer].register_forward_pre_hook(recorded_input, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for module in below:
                del module.forward


@torch.no_grad()
def log_prob_chunks(model, hidden: torch.Tensor) -> Iterator[torch.Tensor]:
    """Next-token log-probabilities (c, V), float32, for successive chunks of ``hidden``."""
    for logits in logit_chunks(model, hidden):
        yield _log_probs(logits)


def logit_chunks(model, hidden: torch.Tensor) -> Iterator[torch.Tensor]:
    """The LM head's logits (c, V) for successive chunks of ``hidden``, in the model's dtype."""
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[0], POSITIONS_PER_CHUNK):
        yield head(hidden[start : start + POSITIONS_PER_CHUNK])


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


def _row_js_of_logits(log_p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return _row_js(log_p, _log_probs(logits))


@torch.no_grad()
def mean_divergence(
    model,
    adapter,
    batch: CalibrationBatch,
    keep: torch.Tensor,
    reference: list[torch.Tensor],
    start: LayerInputs | None = None,
    layer: int = 0,
) -> float:
    """Mean JS divergence from ``reference`` of the sub-model ``keep`` (U,); +inf if broken.
    start, layer: as :func:`target_hidden` (``keep`` differs from ``start``'s below no layer
    under ``layer``)."""
    with adapter.apply_masks(model, keep):
        hidden = target_hidden(model, batch, start, layer)
    total = 0.0
    for ref, logits in zip(reference, logit_chunks(model, hidden), strict=True):
        # the log-softmax inside each block of rows too: a chunk's log-probabilities are
        # never materialised whole
        total += float(by_row_blocks(_row_js_of_logits, ref, logits).sum())
    value = total / max(hidden.shape[0], 1)
    return value if math.isfinite(value) else math.inf


def candidate_sublayers(adapter, modules, units: str) -> list[ModuleUnits]:
    """Non-empty modules of the kinds ``units`` names that the adapter can empty."""
    kinds = {"both": (HEADS, NEURONS), "heads": (HEADS,), "neurons": (NEURONS,)}[units]
    return [
        m
        for m in modules
        if m.kind in kinds and m.n_units > 0 and adapter.min_units(m.kind, allow_empty=True) == 0
    ]


def greedy_removals(
    model,
    adapter,
    batch,
    config: PruneConfig,
    n_before: int,
    progress: bool,
    checkpoint: dict | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> Removals:
    """Virtually remove the least-divergent sub-layer, step by step, while it fits the budget.

    ``next_sublayer`` is None when whole sub-layers spent the budget to within tolerance.
    checkpoint: what ``on_step`` saved in an interrupted run (its removals are taken as made;
    the search is deterministic, so it ends where an uninterrupted one does); on_step: called
    with a JSON-safe state after each removal.
    """
    budget, slack = config.sparsity * n_before, config.tolerance * n_before
    layout = adapter.layout(model)
    costs = adapter.unit_costs(model)  # a whole module's units free exactly the module
    reference = list(log_prob_chunks(model, target_hidden(model, batch)))
    if not reference:
        raise PruningError(
            "the calibration batch has no solution tokens to compare; raise max_length"
        )
    candidates = candidate_sublayers(adapter, layout.modules, config.unit_kinds)
    if sum(float(costs[m.units].sum()) for m in candidates) < budget - slack:
        raise PruningError(
            f"target sparsity {config.sparsity} is unreachable by removing {config.unit_kinds} "
            "sub-layers; lower --sparsity or prune both unit kinds"
        )
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    removed, steps, thin = 0.0, [], None
    checked: bool | None = None  # whether a started forward equals a whole one (checked once)
    if checkpoint is not None:
        steps, checked = list(checkpoint["steps"]), checkpoint["checked"]
        for step in steps:
            module = next((m for m in candidates if m.name == step["module"]), None)
            if module is None or float(costs[module.units].sum()) != step["params"]:
                raise RunDirectoryError(
                    f"the saved FinerCut step {step['module']!r} does not fit this model; "
                    "use a new --out"
                )
            keep[module.units] = False
            removed += float(costs[module.units].sum())
            candidates.remove(module)
    bar = tqdm(desc="finercut", unit="sub-model", disable=not progress)
    try:
        while candidates and budget - removed > slack:
            start = (
                LayerInputs.record(model, adapter, batch, keep) if checked is not False else None
            )
            scored = []
            for module in candidates:
                trial = keep.clone()
                trial[module.units] = False
                divergence = mean_divergence(
                    model, adapter, batch, trial, reference, start, module.layer
                )
                if checked is None and module.layer > 0:
                    whole = mean_divergence(model, adapter, batch, trial, reference)
                    checked = divergence == whole
                    divergence, start = (divergence, start) if checked else (whole, None)
                scored.append((divergence, module))
                bar.update(1)
            divergence, best = min(scored, key=lambda pair: pair[0])  # ties: earliest module
            cost = float(costs[best.units].sum())
            if cost > budget - removed:
                thin = best
                break
            keep[best.units] = False
            removed += cost
            candidates.remove(best)
            steps.append({"module": best.name, "js": divergence, "params": int(cost)})
            if on_step is not None:
                on_step({"method": "finercut", "steps": steps, "checked": checked})
    finally:
        bar.close()
    return Removals(keep, steps, thin)


@METHODS.register("finercut")
def finercut(context: PruneContext) -> MethodResult:
    """Remove whole attention / MLP sub-layers by least output change, to ``config.sparsity``."""
    started = time.perf_counter()
    model, adapter, config = context.model, context.adapter, context.config
    n_before = adapter.count_parameters(model)
    batch = context.make_batch(1)
    saved = context.checkpoint
    if saved is not None and saved.get("method") != "finercut":
        raise RunDirectoryError("--resume: the run's checkpoint is not FinerCut's; use a new --out")
    keep, steps, thin = greedy_removals(
        model, adapter, batch, config, n_before, context.progress, saved, context.on_checkpoint
    )
    slice_units(adapter, model, keep, context.compensation)
    thinned = None
    if thin is not None:
        layout = adapter.layout(model)
        module = next(m for m in layout.modules if (m.layer, m.kind) == (thin.layer, thin.kind))
        wanda = prior_scores(adapter, model, batch, "wanda", config.seed)  # (U_now,)
        score = torch.full_like(wanda, math.inf)
        score[module.units] = wanda[module.units]
        thin_keep = prune_to_target(
            model,
            adapter,
            config,
            score,
            n_before,
            allow_empty=True,
            compensation=context.compensation,
        ).keep
        survivors = torch.nonzero(keep).flatten()  # original index of each current unit
        keep = torch.zeros_like(keep)
        keep[survivors[thin_keep]] = True
        thinned = {"module": module.name, "units_removed": int((~thin_keep).sum())}
    return finish(
        model,
        adapter,
        keep,
        n_before,
        started,
        removed_sublayers=steps,
        thinned=thinned,
        reference="unpruned model",
        divergence="jensen-shannon (nats), mean over solution positions",
    )


finercut.resumes = True  # type: ignore[attr-defined]  # api.prune: --resume continues its greedy
