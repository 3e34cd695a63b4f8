"""The Bonsai round loop (DESIGN.md section 2), one function per step.

Each round, on the current (already physically pruned) model:
prior -> fix the top units -> sample antithetic keep masks -> score every sub-model with the
utility -> regress utility on masks -> select the least important units within the round's
parameter budget -> slice them out. Rounds repeat until the target sparsity is reached.

A round's randomness comes from a generator seeded by (seed, round), so a run resumed from
its saved rounds continues exactly as the uninterrupted run would.
Paper: https://arxiv.org/abs/2402.05406
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import PruneConfig
from .data import Problem, sample_problems
from .errors import PruningError
from .models.adapter import HEADS, NEURONS, ArchitectureAdapter, UnitLayout
from .priors import PRIORS, fixed_units
from .regression import fit_importance
from .sampling import sample_masks
from .selection import round_budget, select_units
from .utility.base import CalibrationBatch
from .utility.validity import UtilityWarning, measure_validity, prior_tiebreak

MAX_SAMPLE_FRACTION = 0.45  # 2f of a module must stay a strict subset of it


@dataclass
class RoundResult:
    """Everything one round decided and measured."""

    index: int  # 1-based
    sample_fraction: float
    budget: float  # parameters this round was allowed to remove
    params_before: int
    params_after: int
    sparsity: float  # after this round, over the original non-embedding parameters
    utility_before: float  # utility of the unmasked model at the start of the round
    utility_mean: float  # mean utility over the round's sub-models
    n_failed: int  # sub-models with a non-finite utility
    regression_alpha: float
    regression_cv_error: float
    timings: dict[str, float]
    # share_beaten, rank_correlation, held_out_r2, constant, no_signal, informative
    # (utility/validity.py), and selected_by: "regression" or "prior" (the no-signal fallback)
    validity: dict
    masks: torch.Tensor  # (N, U) bool keep masks sampled
    scores: torch.Tensor  # (N,) utility of each mask (non-finite replaced)
    candidates: torch.Tensor  # (U,) bool units that were sampled
    beta: torch.Tensor  # (U,) importance; +inf for fixed units
    keep: torch.Tensor  # (U,) bool units kept by the round
    kept_per_module: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict:
        """JSON-safe summary (no tensors)."""
        skip = {"masks", "scores", "candidates", "beta", "keep"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "masks": self.masks,
            "scores": self.scores,
            "candidates": self.candidates,
            "beta": self.beta,
            "keep": self.keep,
        }


def round_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + index)


def prunable_mask(layout: UnitLayout, units: str) -> torch.Tensor:
    """BoolTensor (U,): units of the kinds the user asked to prune."""
    kinds = {"both": (HEADS, NEURONS), "heads": (HEADS,), "neurons": (NEURONS,)}[units]
    return layout.kind_mask(kinds)


def min_keep_per_module(
    adapter: ArchitectureAdapter, layout: UnitLayout, allow_empty: bool
) -> torch.Tensor:
    """LongTensor (M,): a module keeps at least one unit unless the user allows emptying it."""
    return torch.tensor(
        [
            max(adapter.min_units(m.kind, allow_empty=allow_empty), 0 if allow_empty else 1)
            for m in layout.modules
        ]
    )


def check_reachable(adapter, model, config: PruneConfig, n_original: int) -> None:
    """Fail before any work if the floors and unit kinds leave the target out of reach."""
    layout = adapter.layout(model)
    costs = adapter.unit_costs(model)
    prunable = prunable_mask(layout, config.units)
    floor = min_keep_per_module(adapter, layout, config.allow_empty_modules)
    removable = 0.0
    for (module, cost), keep_n in zip(layout.split(costs), floor.tolist(), strict=True):
        if bool(prunable[module.units].all()):
            # the cheapest units may stay; this is an upper bound, which is what we need
            removable += float(cost.sort(descending=True).values[: module.n_units - keep_n].sum())
    reachable = removable / n_original
    if reachable + 1e-9 < config.sparsity - config.tolerance:
        raise PruningError(
            f"target sparsity {config.sparsity} is unreachable: pruning {config.units} with the "
            f"per-module floors removes at most {reachable:.3f}; lower --sparsity, prune both "
            "unit kinds, or pass --allow-empty-modules"
        )


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


def replace_failures(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A failed sub-model gets the worst utility of its round (documented rule)."""
    failed = ~torch.isfinite(scores)
    n_failed = int(failed.sum())
    if n_failed == scores.numel():
        raise PruningError(
            "every sub-model of the round gave a non-finite utility; the model or the "
            "calibration data is broken (completed rounds are kept)"
        )
    worst = scores[~failed].min()
    return torch.where(failed, worst, scores), n_failed


def run_round(
    index: int,
    model,
    adapter,
    utility: Callable,
    batch: CalibrationBatch,
    config: PruneConfig,
    n_original: int,
    progress: bool = True,
) -> RoundResult:
    """One Bonsai round on ``model``: it ends with the chosen units physically removed."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    generator = round_generator(config.seed, index)
    layout = adapter.layout(model)
    module_index = layout.module_index
    params_before = adapter.count_parameters(model)
    budget = round_budget(n_original, params_before, config.sparsity, config.prune_frac)
    fraction = min(MAX_SAMPLE_FRACTION, budget / params_before)

    prior = unit_prior(adapter, model, batch, config.prior, generator)  # (U,)
    fixed = fixed_units(prior, module_index, fraction) | ~prunable_mask(layout, config.units)
    lap("prior")

    masks = sample_masks(
        prior,
        fixed,
        module_index,
        fraction,
        config.masks_per_round // 2,
        generator=generator,
        removal_counts=config.removal_counts,
    )  # (N, U) bool
    lap("sampling")

    with torch.no_grad():
        utility_before = float(utility(model, batch))
    raw_scores = score_masks(
        adapter, model, utility, batch, masks, config.masks_per_forward, progress
    )
    scores, n_failed = replace_failures(raw_scores)
    lap("evaluation")

    candidates = ~fixed
    fit = fit_importance(masks[:, candidates], scores, method=config.regression)
    n_removed = (~masks[:, candidates]).sum(1)  # (N,) units each sub-model removed
    validity = measure_validity(utility_before, scores, n_removed, fit.cv_error, fit.at_max_penalty)
    beta = torch.full((layout.n_units,), math.inf, dtype=torch.float64)
    # no signal: every candidate ties and the prior's rank within its module decides
    beta[candidates] = 0.0 if validity.no_signal else fit.beta.double()
    if (message := validity.warning(index)) is not None:
        warnings.warn(message, UtilityWarning, stacklevel=2)
    selection = select_units(
        beta,
        adapter.unit_costs(model),
        budget,
        module_index,
        min_keep_per_module(adapter, layout, config.allow_empty_modules),
        tiebreak=prior_tiebreak(prior, module_index),
    )
    lap("regression")

    if bool(selection.keep.all()):
        raise PruningError(
            f"round {index} could not remove any unit within its budget of {budget:.0f} "
            "parameters; raise --prune-frac or --tolerance"
        )
    adapter.slice(model, selection.keep)
    lap("slicing")
    params_after = adapter.count_parameters(model)
    kept = {m.name: int(k.sum()) for m, k in layout.split(selection.keep)}
    return RoundResult(
        index=index,
        sample_fraction=fraction,
        budget=budget,
        params_before=params_before,
        params_after=params_after,
        sparsity=1 - params_after / n_original,
        utility_before=utility_before,
        utility_mean=float(scores.mean()),
        n_failed=n_failed,
        regression_alpha=fit.alpha,
        regression_cv_error=fit.cv_error,
        timings=timings,
        validity={
            **validity.to_dict(),
            "selected_by": "prior" if validity.no_signal else "regression",
        },
        masks=masks,
        scores=raw_scores,
        candidates=candidates,
        beta=beta,
        keep=selection.keep,
        kept_per_module=kept,
    )


def target_reached(n_params: int, n_original: int, config: PruneConfig) -> bool:
    return 1 - n_params / n_original >= config.sparsity - config.tolerance


def calibration_problems(pool: list[Problem], config: PruneConfig, index: int) -> list[Problem]:
    """The round's fixed calibration problems: the same for every sub-model of the round."""
    return sample_problems(pool, config.calib_samples, seed=config.seed * 7919 + index)


def iterate_rounds(
    model,
    adapter,
    utility: Callable,
    make_batch: Callable[[int], CalibrationBatch],
    config: PruneConfig,
    n_original: int,
    start: int = 1,
    progress: bool = True,
) -> Iterator[RoundResult]:
    """Yield one RoundResult per round until the target sparsity is reached."""
    index = start
    bar = tqdm(desc="rounds", disable=not progress, unit="round")
    try:
        while not target_reached(adapter.count_parameters(model), n_original, config):
            result = run_round(
                index, model, adapter, utility, make_batch(index), config, n_original, progress
            )
            bar.update(1)
            bar.set_postfix(
                sparsity=f"{result.sparsity:.3f}", utility=f"{result.utility_before:.3f}"
            )
            yield result
            index += 1
    finally:
        bar.close()
