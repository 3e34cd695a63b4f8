"""Sampling sub-models: antithetic pairs of keep masks over a round's candidate units.

The first mask of a pair removes ``k`` units of every module, drawn without replacement from
the module's candidates with probability proportional to ``max(prior) - prior + eps``, the max
taken over the whole module as Bonsai does (over the candidates alone, the best candidate
would get weight ~0 and the top candidates would all be kept together): units the prior
rates low are perturbed more often, yet every candidate can be drawn. Its partner removes exactly the candidates the first kept and keeps the ones it
removed. Each candidate is thus present in exactly one mask of the pair, which balances the
regression's design and cancels much of the sampling noise for the same number of evaluations.

How many units ``k`` a mask removes from a module (``removal_counts``):

- ``"fixed"`` (Bonsai's): ``k = round(f * n)`` for every mask (n counts the module's units,
  fixed ones included). Every mask then removes the same number of units from a module, so
  the regression cannot tell a module whose units all matter from one whose units matter
  little: adding a constant to all of a module's betas changes no prediction, and the global
  selection ends up cutting every layer by about the same amount.
- ``"varied"``: ``k`` is drawn uniformly from ``0..c`` (c candidates, mean ``c / 2``,
  which is ``round(f * n)`` when the priors leave ``2 round(f n)`` candidates) independently for
  each pair and module. The totals per module now vary from mask to mask, so the regression
  also learns which *modules* the utility depends on, and selection can cut the layers that
  matter least harder than the others.
- ``"graded"`` (default): as ``varied``, but each pair also draws an intensity ``t ~ U(0, 1)`` shared by
  all modules, and module m removes ``round(c_m * (t + v_m) / 2)`` with ``v_m ~ U(0, 1)`` its
  own (same mean ``c / 2``). Under ``varied`` the first mask's total is a sum of independent
  per-module draws and its partner's is the rest, so totals barely vary within a round (about
  10% on SmolLM2): the sub-models differ in *which* units they lose, hardly in *how many*, and
  neither the regression nor the validity check sees how the score falls with the amount of
  damage. The shared intensity multiplies the totals' spread by sqrt((M + 1) / 4) over M
  equal modules (2.8x for SmolLM2's 30 MLPs) while half of each module's variance stays its
  own, so module-level effects remain estimable. Round 1 on the packaged model (32 x 8):
  the regression's held-out R^2 rises from -0.04 to 0.58 (perplexity) and the rank
  correlation of damage with score from -0.04 to -0.89; at 20% sparsity the held-out
  reference perplexity falls from 8.41 to 6.50 (dense 3.82).

Paper: Dery et al., "Everybody Prune Now", https://arxiv.org/abs/2402.05406 (section 3.2).
"""

from __future__ import annotations

import torch

from bonsai_prune.core.priors import units_to_remove

EPSILON = 1e-6  # sampling-weight floor, relative to the module's largest gap (or to 1)
REMOVAL_COUNTS = ("varied", "graded", "fixed")


def removal_weights(prior: torch.Tensor, module_max: float | None = None) -> torch.Tensor:
    """Sampling weights (c,) float64 for candidates with prior (c,): low prior, high weight.

    ``module_max``: the largest prior of the candidates' whole module (fixed units included);
    default: the candidates' own largest. ``max - prior`` would give a candidate at the max
    probability zero; the floor keeps it possible, and turns an all-equal prior into uniform
    sampling.
    """
    top = prior.double().max() if module_max is None else torch.tensor(float(module_max))
    gap = (top - prior.double()).clamp(min=0)  # (c,) >= 0
    largest = float(gap.max())
    return gap + EPSILON * (largest if largest > 0 else 1.0)  # relative: the prior's scale is free


def removals_per_module(n_units: int, n_candidates: int, sample_fraction: float) -> int:
    """Units the first mask of a pair removes from one module.

    ``round(f * n)`` (half up), capped by the candidates, and at least 1 whenever the module
    has candidates and f > 0: a candidate that no mask ever removes has a constant column in
    the regression, gets beta = 0, and would be ranked by an artefact rather than by data.
    """
    if n_candidates == 0 or sample_fraction <= 0:
        return 0
    return min(n_candidates, max(1, units_to_remove(n_units, sample_fraction)))


def sample_masks(
    prior: torch.Tensor,
    fixed: torch.Tensor,
    module_index: torch.Tensor,
    sample_fraction: float,
    n_pairs: int,
    *,
    generator: torch.Generator,
    removal_counts: str = "varied",
) -> torch.Tensor:
    """Keep masks (2 * n_pairs, U) bool, True = keep; rows 2i and 2i+1 are an antithetic pair.

    prior (U,): higher = more important; fixed (U,) bool: units kept in every mask (see
    ``priors.fixed_units``); module_index (U,) long: each unit's module; sample_fraction: f in
    [0, 1]; generator: a CPU generator, the only source of randomness; removal_counts:
    "fixed" or "varied" (see the module docstring).

    Fixed units are kept in every mask; modules without candidates are untouched. Row 2i
    removes ``removals_per_module(...)`` candidates per module ("fixed") or a uniform draw
    from 0 to all of them ("varied"); row 2i+1 removes the rest of the module's candidates.
    """
    if removal_counts not in REMOVAL_COUNTS:
        raise ValueError(
            f"unknown removal_counts {removal_counts!r}; choose one of: {', '.join(REMOVAL_COUNTS)}"
        )
    if not 0.0 <= sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in [0, 1], got {sample_fraction}")
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    if not (prior.shape == fixed.shape == module_index.shape) or prior.dim() != 1:
        raise ValueError(
            "prior, fixed and module_index must all be (U,), got "
            f"{tuple(prior.shape)}, {tuple(fixed.shape)}, {tuple(module_index.shape)}"
        )
    prior, fixed, module_index = prior.detach().cpu(), fixed.cpu(), module_index.cpu()
    if not bool(torch.isfinite(prior[~fixed]).all()):
        raise ValueError("prior has non-finite entries among the candidates")
    masks = torch.ones((2 * n_pairs, prior.numel()), dtype=torch.bool)  # (N, U)
    if n_pairs == 0:
        return masks
    by_module = torch.sort(module_index, stable=True).indices  # (U,) grouped by module
    sizes = torch.bincount(module_index).tolist()  # (M,)
    intensity = None  # (P, 1) shared by every module of a pair ("graded")
    if removal_counts == "graded":
        intensity = torch.rand((n_pairs, 1), generator=generator, dtype=torch.float64)
    for units in torch.split(by_module, sizes):  # (n,) global indices of one module
        candidates = units[~fixed[units]]  # (c,)
        k = removals_per_module(units.numel(), candidates.numel(), sample_fraction)
        if k == 0:
            continue
        finite = prior[units][torch.isfinite(prior[units])]  # fixed units may carry +inf
        weights = removal_weights(prior[candidates], float(finite.max())).expand(n_pairs, -1)
        if removal_counts == "fixed":
            # each row draws k distinct candidates; rows are independent pairs
            drawn = torch.multinomial(weights, k, replacement=False, generator=generator)
            first = torch.ones((n_pairs, candidates.numel()), dtype=torch.bool)  # (P, c)
            first.scatter_(1, drawn, False)  # drawn: (P, k)
        else:
            first = _varied_first_masks(weights, generator, intensity)
        masks[0::2, candidates] = first
        masks[1::2, candidates] = ~first  # the antithetic partner, within the candidates
    return masks


def _varied_first_masks(
    weights: torch.Tensor, generator: torch.Generator, intensity: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep masks (P, c) over one module's candidates, row p removing a uniform 0..c of them,
    or (``intensity`` (P, 1) in [0, 1]) ``round(c * (intensity + own draw) / 2)`` of them.

    A weighted draw of all c candidates without replacement is a weighted random order; its
    first k entries are distributed exactly as a weighted draw of k, so one order per row
    serves every k.
    """
    n_pairs, n_candidates = weights.shape
    order = torch.multinomial(weights, n_candidates, replacement=False, generator=generator)
    if intensity is None:
        counts = torch.randint(0, n_candidates + 1, (n_pairs, 1), generator=generator)  # (P, 1)
    else:
        own = torch.rand((n_pairs, 1), generator=generator, dtype=torch.float64)
        counts = torch.round(n_candidates * (intensity + own) / 2).long()  # (P, 1) in 0..c
    removed = torch.arange(n_candidates)[None, :] < counts  # (P, c) by position in the order
    first = torch.ones((n_pairs, n_candidates), dtype=torch.bool)
    first.scatter_(1, order, ~removed)
    return first
