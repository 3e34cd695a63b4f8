"""Bonsai, the round loop (DESIGN.md section 2), one function per step.

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

from bonsai_prune.config import PruneConfig
from bonsai_prune.core.allocation import module_design, module_importance
from bonsai_prune.core.budget import (
    check_reachable,
    min_keep_per_module,
    module_multiples,
    prunable_mask,
    round_budget,
    rounds_left,
    selection_costs,
    target_reached,
)
from bonsai_prune.core.priors import fixed_units
from bonsai_prune.core.regression import fit_importance
from bonsai_prune.core.sampling import sample_masks
from bonsai_prune.core.selection import select_units
from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.distributed import evaluator_pool
from bonsai_prune.errors import PruningError, RunDirectoryError
from bonsai_prune.methods.base import METHODS, MethodResult, PruneContext
from bonsai_prune.methods.forward import score_masks, unit_prior
from bonsai_prune.models.compensation import Compensation, refit_outputs, slice_units
from bonsai_prune.models.decoding import release_fused
from bonsai_prune.utility.validity import (
    UtilityWarning,
    measure_validity,
    prior_tiebreak,
    removed_parameters,
)

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
    # n_scored, stopped ("stable" or "budget"), agreements: Jaccard of successive checks
    sampling: dict
    masks: torch.Tensor  # (N, U) bool keep masks scored
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


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two bool sets (U,); 1 when both are empty."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def score_until_stable(
    masks: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    decide: Callable,
    config: PruneConfig,
) -> tuple[torch.Tensor, dict]:
    """Scores (n,) of the first n masks (N, U), and how sampling ended.

    With ``config.stop_agreement`` 0 every mask is scored. Otherwise masks are scored
    ``masks_per_check`` at a time (whole antithetic pairs) and after each batch the round's
    selection is decided on what was scored so far; sampling ends
    when the units removed by two successive selections agree (Jaccard) at least
    ``stop_agreement``, or at ``masks_per_round``. The masks were all drawn up front, so the
    first n are those a full round would score: stopping changes how many, never which.
    """
    if not config.stop_agreement:
        return score(masks), {"n_scored": masks.shape[0], "stopped": "budget", "agreements": []}
    step = config.masks_per_check
    parts, agreements, previous = [], [], None
    for start in range(0, masks.shape[0], step):
        parts.append(score(masks[start : start + step]))
        scored = torch.cat(parts)
        if scored.numel() == masks.shape[0]:
            break  # nothing left to save
        clean, _ = replace_failures(scored)
        removed = ~decide(masks[: scored.numel()], clean)[3].keep  # (U,)
        if previous is not None:
            agreements.append(jaccard(previous, removed))
            if agreements[-1] >= config.stop_agreement:
                return scored, {
                    "n_scored": scored.numel(),
                    "stopped": "stable",
                    "agreements": agreements,
                }
        previous = removed
    scored = torch.cat(parts)
    return scored, {"n_scored": scored.numel(), "stopped": "budget", "agreements": agreements}


def run_round(
    index: int,
    model,
    adapter,
    utility: Callable,
    batch: CalibrationBatch,
    config: PruneConfig,
    n_original: int,
    progress: bool = True,
    score: Callable = score_masks,  # or an evaluator pool's (distributed/): same signature
    compensation: Compensation | None = None,
) -> RoundResult:
    """One Bonsai round on ``model``: it ends with the chosen units physically removed
    (their modules' output projections refitted first, with ``compensation``)."""
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
    budget = round_budget(n_original, params_before, config.sparsity, config.prune_fraction)
    fraction = min(MAX_SAMPLE_FRACTION, budget / params_before)

    prior = unit_prior(adapter, model, batch, config.prior, generator)  # (U,)
    fixed = fixed_units(prior, module_index, fraction) | ~prunable_mask(layout, config.unit_kinds)
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
    candidates = ~fixed
    costs, shared = selection_costs(adapter, model)
    unit_costs = adapter.unit_costs(model)  # (U,) K/V shared evenly: for designs and validity
    floors = min_keep_per_module(adapter, layout, config.allow_empty_modules)
    tiebreak = prior_tiebreak(prior, module_index)
    multiples = module_multiples(layout, config.mlp_multiple)  # (M,)

    def decide(masks: torch.Tensor, scores: torch.Tensor):
        """Regress the scores on the masks and select the round's units to remove."""
        if config.regression == "modules":
            design, modules = module_design(masks, candidates, module_index, unit_costs)
            fit = fit_importance(design, scores, method="ridge")
        else:
            scale = (
                costs[candidates].double().clamp_min(1.0).sqrt()
                if config.beta_prior == "cost"
                else None
            )
            fit = fit_importance(
                masks[:, candidates], scores, method=config.regression, prior_scale=scale
            )
        removed = removed_parameters(masks, unit_costs)  # (N,)
        validity = measure_validity(
            utility_before, scores, removed, fit.cv_error, fit.at_max_penalty
        )
        beta = torch.full((layout.n_units,), math.inf, dtype=torch.float64)
        if validity.no_signal:  # every candidate ties and the prior's rank in its module decides
            beta[candidates] = 0.0
        elif config.regression == "modules":
            beta = module_importance(fit.beta, modules, candidates, module_index, unit_costs, prior)
        else:
            beta[candidates] = fit.beta.double()
        selection = select_units(
            beta,
            costs,
            budget,
            module_index,
            floors,
            shared=shared,
            tiebreak=tiebreak,
            multiple=multiples,
            at_least_one=True,  # a last round smaller than one unit (or block) still ends
        )
        return fit, validity, beta, selection

    def score_some(some: torch.Tensor) -> torch.Tensor:
        return score(adapter, model, utility, batch, some, config.masks_per_forward, progress)

    raw_scores, stopping = score_until_stable(masks, score_some, decide, config)
    masks = masks[: raw_scores.numel()]
    scores, n_failed = replace_failures(raw_scores)
    lap("evaluation")

    fit, validity, beta, selection = decide(masks, scores)
    if (message := validity.warning(index)) is not None:
        warnings.warn(message, UtilityWarning, stacklevel=2)
    lap("regression")

    if bool(selection.keep.all()):
        raise PruningError(
            f"round {index} found no unit it may remove (every module at its floor or fixed); "
            "lower --sparsity or pass --allow-empty-modules"
        )
    release_fused(model)  # the sub-models' generation is over; the weights are about to change
    if compensation is not None:
        refit_outputs(adapter, model, selection.keep, compensation)
        lap("compensation")
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
        sampling=stopping,
        masks=masks,
        scores=raw_scores,
        candidates=candidates,
        beta=beta,
        keep=selection.keep,
        kept_per_module=kept,
    )


def iterate_rounds(
    model,
    adapter,
    utility: Callable,
    make_batch: Callable[[int], CalibrationBatch],
    config: PruneConfig,
    n_original: int,
    start: int = 1,
    progress: bool = True,
    score: Callable = score_masks,
    compensation: Compensation | None = None,
) -> Iterator[RoundResult]:
    """Yield one RoundResult per round until the target sparsity is reached."""
    index = start
    total = rounds_left(adapter.count_parameters(model), n_original, config)
    bar = tqdm(desc="rounds", total=total, disable=not progress, unit="round")
    try:
        while not target_reached(adapter.count_parameters(model), n_original, config):
            result = run_round(
                index,
                model,
                adapter,
                utility,
                make_batch(index),
                config,
                n_original,
                progress,
                score,
                compensation,
            )
            bar.update(1)
            bar.set_postfix(
                sparsity=f"{result.sparsity:.3f}", utility=f"{result.utility_before:.3f}"
            )
            yield result
            index += 1
    finally:
        bar.close()


def replay_rounds(
    model,
    adapter,
    completed: list[tuple[torch.Tensor, dict]],
    compensation: Compensation | None = None,
) -> None:
    """Re-apply the saved keep masks of completed rounds: slicing (and compensation, on its
    fixed calibration text) is deterministic, so the model ends where the interrupted run stood."""
    for index, (keep, figures) in enumerate(completed, start=1):
        if keep.shape[0] != adapter.layout(model).n_units:
            raise RunDirectoryError(f"saved round {index} does not fit the model; use a new --out")
        slice_units(adapter, model, keep, compensation)
        if adapter.count_parameters(model) != figures["params_after"]:
            raise RunDirectoryError(f"replaying saved round {index} gave a different model")


@METHODS.register("bonsai")
def bonsai(context: PruneContext) -> MethodResult:
    """Prune by rounds of sampled sub-models, regression and selection (resumable)."""
    started = time.perf_counter()
    model, adapter, config = context.model, context.adapter, context.config
    n_original = adapter.count_parameters(model)
    check_reachable(adapter, model, config, n_original)
    result = MethodResult(n_original, n_original, 0.0, 0.0)
    result.round_figures = [figures for _, figures in context.completed_rounds]
    result.keep_masks = [keep for keep, _ in context.completed_rounds]
    # workers build their replica from the model as it is now and replay result.keep_masks
    compensation = context.compensation
    with evaluator_pool(
        context.workers,
        model,
        result.keep_masks,
        context.utility,
        score_masks,
        compensates=compensation is not None,
    ) as score:
        replay_rounds(model, adapter, context.completed_rounds, compensation)
        for round_result in iterate_rounds(
            model,
            adapter,
            context.utility,
            context.make_batch,
            config,
            n_original,
            start=len(context.completed_rounds) + 1,
            progress=context.progress,
            score=score,
            compensation=compensation,
        ):
            result.rounds.append(round_result)
            result.keep_masks.append(round_result.keep)
            result.round_figures.append(round_result.figures())
            if context.on_round is not None:
                context.on_round(round_result)
    result.params_after = adapter.count_parameters(model)
    result.sparsity = 1 - result.params_after / n_original
    result.seconds = time.perf_counter() - started
    return result


bonsai.resumes = True  # type: ignore[attr-defined]  # api.prune: --resume continues its rounds
bonsai.uses_utility = True  # type: ignore[attr-defined]  # it scores sub-models with config.utility
