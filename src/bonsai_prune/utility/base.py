"""The utility contract and the calibration batch every utility scores on.

A utility maps a (virtually masked) model and a calibration batch to one number, higher is
better. Named utilities are classes registered in ``UTILITIES``; any Python callable
``(model, batch) -> float`` works too and receives the same :class:`CalibrationBatch`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.registry import Registry

UTILITIES: Registry[type] = Registry("utility")


class Utility(Protocol):
    """Scores one sub-model on a calibration batch; higher is better."""

    def __call__(self, model, batch: CalibrationBatch) -> float: ...


@torch.no_grad()
def solution_nll(model, batch: CalibrationBatch, rows_per_chunk: int = 4) -> torch.Tensor:
    """Mean negative log-likelihood of the reference solution tokens, per problem (n,).

    Runs the decoder once and applies the LM head only at the scored positions: the
    full-vocabulary projection at every position would be about a fifth of the work, wasted.
    Rows are grouped by length and each chunk is cut to its longest row, so little padding is
    computed (a third of a padded GSM8K batch is padding). Running rows one by one computes
    none but was slower and erratic on 2 CPU cores (many small kernels); chunks of 4 were not.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    lengths = batch.attention_mask.sum(1)  # (n,) right padding: real tokens come first
    order = torch.argsort(lengths, descending=True, stable=True)
    nll = torch.empty(len(order), device=batch.input_ids.device)
    for start in range(0, len(order), rows_per_chunk):
        rows = order[start : start + rows_per_chunk]
        width = int(lengths[rows].max())
        ids = batch.input_ids[rows, :width]
        attn = batch.attention_mask[rows, :width]
        target = batch.target_mask[rows, :width]
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state  # (b, L, H)
        logits = head(hidden[target]).float()  # (n_scored, V)
        labels = torch.roll(ids, shifts=-1, dims=1)[target]  # (n_scored,)
        token_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        row = torch.nonzero(target)[:, 0]  # which problem of the chunk each scored token is
        sums = torch.zeros(len(rows), device=ids.device).index_add_(0, row, token_nll)
        nll[rows] = sums / target.sum(1).clamp(min=1)
    return nll
