"""Compensated slicing: before units go, the projections that read them are refitted so the
kept units also write what the removed ones wrote (forward passes only, no gradient).

Removing heads or neurons drops input channels of each module's output projection (``o_proj``,
``down_proj``: ``adapter.output_projections``) and, with them, their contribution to the
residual stream. Forwards over a fixed calibration text record, for every projection about
to lose channels, the Gram matrix of its inputs (a chunk of layers per forward, deepest first,
so that only one chunk's matrices are held); ``core.compensation.refit_kept_columns`` then
solves the least-squares refit of the kept columns. Measured on the packaged model
(``results/search-quality/ppl20.md``, Bonsai+perplexity, held-out reference perplexity):
5.21 -> 4.43 at 20% sparsity, 8.96 -> 5.65 at 35%, for ~9 s per round on 2 cores.

The calibration text is fixed for the whole run (not the round's batch), so replaying a run's
keep masks (``--resume``, an evaluator pool's replicas) refits exactly as the run did: a
slice is a function of (model, keep, :class:`Compensation`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bonsai_prune.core.compensation import refit_kept_columns
from bonsai_prune.models.adapter import HEADS
from bonsai_prune.models.decoding import release_fused

DAMPING = 0.01  # ridge, as a fraction of the mean diagonal of the kept channels' Gram matrix
ROWS_PER_FORWARD = 8  # calibration rows per forward while recording Gram matrices
# float32 Gram matrices held at once (a chunk of layers); the packaged model's are ~320 MB in
# all, a 7B Llama's ~18 GB, so they are recorded a few layers at a time (one forward each)
GRAM_BYTES = 128 * 2**20


@dataclass(frozen=True)
class Compensation:
    """The calibration text whose activations refit the output projections before a slice."""

    input_ids: torch.Tensor  # (B, S) prompt + reference solution, padded
    attention_mask: torch.Tensor  # (B, S) 1 on real tokens: only those enter the Gram matrices
    damping: float = DAMPING

    def to(self, device: torch.device | str) -> Compensation:
        return Compensation(self.input_ids.to(device), self.attention_mask.to(device), self.damping)


def slice_units(adapter, model, keep: torch.Tensor, compensation: Compensation | None) -> None:
    """Remove the units where ``keep`` (U,) is False, in place; with ``compensation``, refit
    the partly kept modules' output projections first. Every method slices through here."""
    release_fused(model)
    if compensation is not None:
        refit_outputs(adapter, model, keep, compensation)
    adapter.slice(model, keep)


@torch.no_grad()
def refit_outputs(adapter, model, keep: torch.Tensor, compensation: Compensation) -> int:
    """Refit, in place, the output projection of every module that ``keep`` (U,) thins but
    does not empty; the number refitted. Emptied and untouched modules are left alone."""
    keep = keep.cpu().bool()
    projections = adapter.output_projections(model)
    thinned = {
        (module.layer, module.kind): mask
        for module, mask in adapter.layout(model).split(keep)
        if 0 < int(mask.sum()) < module.n_units
    }
    if not thinned:
        return 0
    device = next(model.parameters()).device
    targets = {key: projections[key][0] for key in thinned}
    # Deepest layers first: refitting a chunk changes only what deeper layers (already
    # recorded) see, so every Gram matrix is the one a single pass would have recorded.
    for key, gram in each_input_gram(model, targets, compensation.to(device)):
        linear, width = projections[key]
        kept = thinned[key].repeat_interleave(width).to(linear.weight.device)
        linear.weight.copy_(refit_kept_columns(linear.weight, gram, kept, compensation.damping))
    return len(thinned)


def _forward_order(key: tuple[int, str]) -> tuple[int, int]:
    """Where a projection runs in the forward: by layer, the attention's before the MLP's."""
    layer, kind = key
    return layer, 0 if kind == HEADS else 1


def gram_chunks(
    targets: dict[tuple[int, str], torch.nn.Linear], budget_bytes: int
) -> list[list[tuple[int, str]]]:
    """The keys of ``targets`` in chunks of whole layers, deepest first, whose float32 Gram
    matrices take at most ``budget_bytes`` together (a chunk holds at least one layer)."""
    layers: dict[int, list[tuple[int, str]]] = {}
    for key in sorted(targets, key=_forward_order):
        layers.setdefault(key[0], []).append(key)
    chunks: list[list[tuple[int, str]]] = []
    used = budget_bytes  # forces a new chunk for the first layer
    for layer in sorted(layers, reverse=True):
        size = sum(4 * targets[key].in_features ** 2 for key in layers[layer])
        if used + size > budget_bytes:
            chunks.append([])
            used = 0
        chunks[-1] = layers[layer] + chunks[-1]
        used += size
    return chunks


def chunked_input_grams(
    model,
    targets: dict[tuple[int, str], torch.nn.Linear],
    compensation: Compensation,
    budget_bytes: int | None = None,
) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """:func:`input_grams` of ``targets`` a chunk at a time (:func:`gram_chunks`, deepest
    layers first): the memory of one chunk's Gram matrices instead of all of them, for one
    calibration forward per chunk, each stopped after its chunk's deepest layer. Between
    chunks the caller may change the weights of the chunk it received. ``budget_bytes``:
    :data:`GRAM_BYTES` unless given."""
    budget = GRAM_BYTES if budget_bytes is None else budget_bytes
    for chunk in gram_chunks(targets, budget):
        yield input_grams(model, {key: targets[key] for key in chunk}, compensation)


def each_input_gram(
    model, targets: dict[tuple[int, str], torch.nn.Linear], compensation: Compensation
) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
    """(key, Gram matrix) of every target, from :func:`chunked_input_grams`, each dropped
    once the caller moves on (the refit's float64 copies then exist one at a time)."""
    for grams in chunked_input_grams(model, targets, compensation):
        while grams:
            yield grams.popitem()


class _Recorded(Exception):
    """Raised by the deepest recording hook: the rest of the forward is not needed."""


@torch.no_grad()
def input_grams(
    model, targets: dict[tuple[int, str], torch.nn.Linear], compensation: Compensation
) -> dict[tuple[int, str], torch.Tensor]:
    """key -> X^T X (C, C) of the inputs of ``targets[key]`` over the real (unpadded) tokens of
    the calibration text, float32 on the model's device (the refit solves in float64, one
    module at a time: all of them in float64 at once would triple the memory they take).
    The forward stops once the deepest target has been recorded."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    if not targets:
        return grams
    real = compensation.attention_mask.bool()  # (B, S)
    rows = slice(0, 0)

    def recorder(key):
        def record(module, args):
            x = args[0].detach()[real[rows]].float()  # (tokens, C)
            grams[key] = grams.get(key, 0) + x.T @ x

        return record

    def record_and_stop(module, args):
        recorder(deepest)(module, args)
        raise _Recorded

    deepest = max(targets, key=_forward_order)
    handles = [
        linear.register_forward_pre_hook(record_and_stop if key == deepest else recorder(key))
        for key, linear in targets.items()
    ]
    decoder = model.get_decoder()
    try:
        for start in range(0, compensation.input_ids.shape[0], ROWS_PER_FORWARD):
            rows = slice(start, start + ROWS_PER_FORWARD)
            try:
                decoder(
                    input_ids=compensation.input_ids[rows],
                    attention_mask=compensation.attention_mask[rows],
                    use_cache=False,
                )
            except _Recorded:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return grams
