"""Bonsai's original utility: teacher-forced perplexity of the reference solution.

Returned as ``-log(perplexity)`` (the mean solution-token log-likelihood): the ranking of
sub-models is exactly that of ``-perplexity``, but a sub-model that breaks the model cannot
produce a perplexity of 10^4 that swamps the regression of every other sample.
Paper: https://arxiv.org/abs/2402.05406
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.utility.base import UTILITIES, solution_nll, sub_model_nll


@UTILITIES.register("perplexity")
class PerplexityUtility:
    """-mean NLL of GSM8K reference solutions given their questions (solution tokens only)."""

    def __init__(self, config=None) -> None:
        self.config = config

    def __call__(self, model, batch: CalibrationBatch) -> float:
        nll = solution_nll(model, batch)  # (n,) NaN where nothing could be scored
        value = -float(nll.nanmean())
        return value if math.isfinite(value) else float("nan")

    def score_masks(
        self, model, batch: CalibrationBatch, masks: torch.Tensor, apply_masks: Callable
    ) -> list[float]:
        """-mean NLL of several sub-models (G, U), one unpadded forward per problem; a
        non-finite value is left for ``methods.forward.score_masks`` to turn into NaN."""
        with apply_masks(masks):  # (G, U): row g runs sub-model g
            nll = sub_model_nll(model, batch, masks.shape[0], batch.target_mask)  # (G, n)
        return (-nll.nanmean(dim=1)).tolist()
