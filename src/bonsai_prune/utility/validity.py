"""Does a round's utility rank damage? Pure checks on the round's scores (DESIGN.md §3, Validity).

A utility is only useful to Bonsai if removing units lowers it. Every round therefore records:

- ``share_beaten``: the share of sub-models the unmasked model scores above (a tie counts
  half). Every sub-model is the unmasked model with units removed, so a sound utility puts the
  unmasked model above nearly all of them. (The first study's U† at 20 tokens beat under half.)
- ``rank_correlation``: Spearman's rho between the parameters a sub-model removed and its
  score: clearly negative for a utility that sees damage, near 0 for noise. Parameters, not a
  count of units: a head is not a neuron, and with varied per-module removal counts the unit
  totals of a round barely vary (each antithetic pair removes all candidates between its rows),
  so a unit count measured noise even for perplexity (round 1 at 32 x 8: rho +0.23).
- ``held_out_r2``: 1 - the regression's cross-validated error / the scores' variance; at or
  below 0 the fitted betas predict held-out sub-models no better than their mean.

``no_signal`` (constant scores, or a regression that chose its heaviest penalty and still
predicts held-out sub-models no better than their mean, R^2 <= 0) makes the round select by the
prior's ranking within each module instead of by beta (``prior_tiebreak``), never by unit
position. R^2 <= 0 alone is not enough: with 16-32 masks and thousands of candidates, per-unit
betas rarely predict held-out sub-models (perplexity, round 1 of the packaged model: R^2 -0.27
at a moderate penalty, yet rank correlation -0.69), while betas shrunk to the heaviest penalty
rank units by their correlation with a utility that is, there, indistinguishable from noise.
``informative`` is False, and the run warns, when the unmasked model beats fewer than
``MIN_SHARE_BEATEN`` of its sub-models or rho is above ``MAX_RANK_CORRELATION``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

MIN_SHARE_BEATEN = 0.9
MAX_RANK_CORRELATION = -0.3


class UtilityWarning(UserWarning):
    """A round's utility does not rank damage (see the module docstring)."""


@dataclass(frozen=True)
class Validity:
    """One round's validity figures (JSON-safe through ``to_dict``)."""

    share_beaten: float  # in [0, 1]
    rank_correlation: float  # Spearman rho of (units removed, score); NaN if either is constant
    held_out_r2: float  # NaN when there was no fit (constant scores)
    constant: bool  # every sub-model scored the same
    no_signal: bool  # constant, or heaviest penalty and held_out_r2 <= 0: select by the prior
    informative: bool  # share_beaten and rank_correlation pass their thresholds

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }

    def warning(self, index: int) -> str | None:
        """A one-line warning for an uninformative round, or None."""
        if self.informative:
            return None
        rho = "n/a" if math.isnan(self.rank_correlation) else f"{self.rank_correlation:.2f}"
        fallback = "; selecting by the prior" if self.no_signal else ""
        return (
            f"round {index}: the utility barely ranks damage (unmasked model beats "
            f"{100 * self.share_beaten:.0f}% of its sub-models, rank correlation of "
            f"parameters removed with score {rho}){fallback}"
        )


def share_beaten(score_before: float, scores: torch.Tensor) -> float:
    """Share of ``scores`` (N,) below ``score_before``; ties count half."""
    below = float((scores < score_before).double().sum())
    tied = float((scores == score_before).double().sum())
    return (below + 0.5 * tied) / scores.numel()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of x (N,) and y (N,) (average ranks for ties); NaN if constant."""
    from scipy.stats import spearmanr  # deferred: a slow import

    if x.numel() < 2 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    return float(spearmanr(x.double().numpy(), y.double().numpy()).statistic)


def held_out_r2(cv_error: float, scores: torch.Tensor) -> float:
    """1 - held-out mean squared error / variance of the scores (N,); NaN if they are constant."""
    variance = float(scores.double().var(unbiased=False))
    return 1.0 - cv_error / variance if variance > 0 else math.nan


def removed_parameters(masks: torch.Tensor, unit_costs: torch.Tensor) -> torch.Tensor:
    """Parameters each sub-model removed (N,): masks (N, U) bool keep, unit_costs (U,)."""
    return (~masks).double() @ unit_costs.double().cpu()


def measure_validity(
    score_before: float,
    scores: torch.Tensor,
    removed: torch.Tensor,
    cv_error: float,
    at_max_penalty: bool = True,
) -> Validity:
    """Validity of one round: the unmasked model's score, the sub-models' scores (N,), the
    parameters each removed (N,), the regression's held-out squared error (utility units^2) and
    whether it chose its heaviest penalty."""
    constant = bool((scores == scores[0]).all())
    r2 = held_out_r2(cv_error, scores)
    rho = spearman(removed, scores)
    share = share_beaten(score_before, scores)
    no_signal = constant or (bool(at_max_penalty) and not r2 > 0)
    informative = not constant and share >= MIN_SHARE_BEATEN and rho <= MAX_RANK_CORRELATION
    return Validity(share, rho, r2, constant, no_signal, informative)


def prior_tiebreak(prior: torch.Tensor, module_index: torch.Tensor) -> torch.Tensor:
    """Each unit's rank by prior within its module, over the module's size: (U,) in [0, 1).

    0 is the module's least important unit. Used to order units whose betas tie (all of them
    when a round has no signal), so selection walks up every module's prior ranking evenly
    instead of removing units by their position in the model.
    """
    prior, module_index = prior.detach().cpu().double(), module_index.cpu()
    order = torch.sort(prior, stable=True).indices  # (U,) ascending prior
    order = order[torch.sort(module_index[order], stable=True).indices]  # grouped by module
    sorted_module = module_index[order]  # (U,) non-decreasing
    group_start = torch.searchsorted(sorted_module, sorted_module)  # (U,)
    sizes = torch.bincount(module_index).double()  # (M,)
    rank = torch.empty_like(prior)
    rank[order] = (torch.arange(prior.numel()) - group_start).double() / sizes[sorted_module]
    return rank
