"""Compensated slicing: before units go, the projections that read them are refitted so the
kept units also write what the removed ones wrote (forward passes only, no gradient).

Removing heads or neurons drops input channels of each module's output projection (``o_proj``,
``down_proj``: ``adapter.output_projections``) and, with them, their contribution to the
residual stream. One forward over a fixed calibration text records, for every projection about
to lose channels, the Gram matrix of its inputs; ``core.compensation.refit_kept_columns`` then
solves the least-squares refit of the kept columns. Measured on the packaged model
(``results/search-quality/ppl20.md``, Bonsai+perplexity, held-out reference perplexity):
5.21 -> 4.43 at 20% sparsity, 8.96 -> 5.65 at 35%, for ~9 s per round on 2 cores.

The calibration text is fixed for the whole run (not the round's batch), so replaying a run's
keep masks (``--resume``, an evaluator pool's replicas) refits exactly as the run did: a
slice is a function of (model, keep, :class:`Compensation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonsai_prune.core.compensation import refit_kept_columns

DAMPING = 0.01  # ridge, as a fraction of the mean diagonal of the kept channels' Gram matrix
ROWS_PER_FORWARD = 8  # calibration rows per forward while recording Gram matrices


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
    grams = input_grams(
        model, {key: projections[key][0] for key in thinned}, compensation.to(device)
    )
    for key, mask in thinned.items():
        linear, width = projections[key]
        kept = mask.repeat_interleave(width).to(linear.weight.device)
        gram = grams.pop(key)  # freed once used: the float64 copies exist one at a time
        refitted = refit_kept_columns(linear.weight, gram, kept, compensation.damping)
        linear.weight.copy_(refitted)
    return len(thinned)


@torch.no_grad()
def input_grams(
    model, targets: dict[tuple[int, str], torch.nn.Linear], compensation: Compensation
) -> dict[tuple[int, str], torch.Tensor]:
    """key -> X^T X (C, C) of the inputs of ``targets[key]`` over the real (unpadded) tokens of
    the calibration text, float32 on the model's device (the refit solves in float64, one
    module at a time: all of them in float64 at once would triple the memory they take)."""
    grams: dict[tuple[int, str], torch.Tensor] = {}
    real = compensation.attention_mask.bool()  # (B, S)
    rows = slice(0, 0)

    def recorder(key):
        def record(module, args):
            x = args[0].detach()[real[rows]].float()  # (tokens, C)
            grams[key] = grams.get(key, 0) + x.T @ x

        return record

    handles = [linear.register_forward_pre_hook(recorder(key)) for key, linear in targets.items()]
    decoder = model.get_decoder()
    try:
        for start in range(0, compensation.input_ids.shape[0], ROWS_PER_FORWARD):
            rows = slice(start, start + ROWS_PER_FORWARD)
            decoder(
                input_ids=compensation.input_ids[rows],
                attention_mask=compensation.attention_mask[rows],
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    return grams
