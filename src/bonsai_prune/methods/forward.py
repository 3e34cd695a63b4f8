"""Forward passes every method shares: the prior's statistics pass, and scoring virtual
sub-models (keep masks applied by the adapter's hooks, no weight changed) with a utility."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from bonsai_prune.core.priors import PRIORS
from bonsai_prune.data.calibration import CalibrationBatch


def unit_prior(adapter, model, batch: CalibrationBatch, prior: str, generator) -> torch.Tensor:
    """One forward per calibration problem (no padding to pollute the statistics)."""
    with torch.no_grad():
        with adapter.collect_stats(model) as stats:
            for row in range(batch.input_ids.shape[0]):
                length = int(batch.attention_mask[row].sum())
                model.get_decoder()(input_ids=batch.input_ids[row : row + 1, :length])
        return PRIORS.get(prior)(stats.result(), generator).double()


def score_masks(
    adapter,
    model,
    utility: Callable,
    batch: CalibrationBatch,
    masks: torch.Tensor,
    masks_per_forward: int,
    progress: bool,
) -> torch.Tensor:
    """Utility of each virtual sub-model (N,); non-finite results stay NaN for the caller.

    A utility with a ``score_masks(model, batch, masks, apply_masks)`` method scores groups of
    ``masks_per_forward`` sub-models in one batched forward; any other callable is called
    once per mask inside ``adapter.apply_masks``.
    """
    n = masks.shape[0]
    group = masks_per_forward if hasattr(utility, "score_masks") else 1
    scores = torch.empty(n, dtype=torch.float64)
    with tqdm(total=n, desc="  sub-models", leave=False, disable=not progress) as bar:
        for start in range(0, n, group):
            chunk = masks[start : start + group]
            with torch.no_grad():
                if group > 1:
                    values = utility.score_masks(
                        model, batch, chunk, lambda keep: adapter.apply_masks(model, keep)
                    )
                else:
                    with adapter.apply_masks(model, chunk[0]):
                        values = [utility(model, batch)]
            for offset, value in enumerate(values):
                value = float(value)
                scores[start + offset] = value if math.isfinite(value) else float("nan")
            bar.update(len(chunk))
    return scores
