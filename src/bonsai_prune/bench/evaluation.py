"""Sub-model evaluation, the project's path against the reference loop on the same masks and
problems: time, FLOPs, FLOP/s and rank agreement; the time to 50% with Bonsai's own budget,
projected from them (``project_search``)."""

from __future__ import annotations

import math

import torch

from bonsai_prune.bench.config import BenchConfig
from bonsai_prune.bench.measure import spearman, timed
from bonsai_prune.bench.reference import reference_perplexity, reference_u_dagger


def attention_flops(adapter, model, lengths: list[int]) -> int:
    """FLOPs of causal attention (scores and weighted sum, the causal half only) over rows of
    these lengths: the part of a forward that is not a matrix product with a weight."""
    from bonsai_prune.models.adapter import HEADS

    channels = sum(
        linear.in_features  # heads x head_dim of the layer's o_proj
        for (_, kind), (linear, _) in adapter.output_projections(model).items()
        if kind == HEADS
    )
    return sum(2 * 2 * channels * length * (length + 1) // 2 for length in lengths)


def evaluation_flops(adapter, model, batch, padded: bool) -> dict:
    """FLOPs of one perplexity evaluation of ``batch``: the body's weights over every token,
    attention, and the LM head over the scored tokens; ``padded``: the reference loop's work
    (padded rows, the LM head at every position)."""
    lengths = batch.attention_mask.sum(1).tolist()
    if padded:
        lengths = [batch.attention_mask.shape[1]] * len(lengths)
    tokens = sum(lengths)
    head_tokens = tokens if padded else batch.n_target_tokens
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    return {
        "body": 2 * adapter.count_parameters(model) * tokens,
        "attention": attention_flops(adapter, model, lengths),
        "head": 2 * hidden * vocab * head_tokens,
    }


def bench_evaluation(config: BenchConfig, progress: bool) -> dict:
    """Evaluations per second and utility agreement, project path vs reference loop."""
    from bonsai_prune.config import PruneConfig, UtilityConfig
    from bonsai_prune.core.priors import fixed_units
    from bonsai_prune.core.sampling import sample_masks
    from bonsai_prune.data.calibration import build_batch
    from bonsai_prune.data.problems import load_gsm8k, sample_problems
    from bonsai_prune.methods.forward import score_masks
    from bonsai_prune.models import adapter_for, load_model
    from bonsai_prune.utility import resolve_utility
    from bonsai_prune.utility.references import prepare_self_references

    fast_model, tokenizer = load_model(config.model, dtype=config.dtype)
    ref_model, _ = load_model(config.model, dtype="fp32")
    adapter = adapter_for(fast_model)
    layout = adapter.layout(fast_model)
    problems = sample_problems(load_gsm8k("train"), config.calib_samples, seed=config.seed)
    batch = build_batch(tokenizer, problems)
    generator = torch.Generator().manual_seed(config.seed)
    prior = torch.rand(layout.n_units, generator=generator, dtype=torch.float64)
    fixed = fixed_units(prior, layout.module_index, 0.1)
    masks = sample_masks(
        prior, fixed, layout.module_index, 0.1, config.n_masks // 2, generator=generator
    )
    per_forward = PruneConfig().masks_per_forward
    figures: dict = {
        "n_masks": config.n_masks,
        "calib_samples": config.calib_samples,
        "fast_dtype": str(fast_model.dtype).removeprefix("torch."),
    }

    for name in ("perplexity", "comprehensive"):
        utility = resolve_utility(UtilityConfig(name=name))
        prepare_self_references(utility, ref_model, tokenizer, problems)
        reference_score = reference_perplexity if name == "perplexity" else reference_u_dagger
        # warm-up of both paths on the shapes they will time: kernels, the embedding model
        score_masks(adapter, fast_model, utility, batch, masks[:per_forward], per_forward, False)
        with adapter.apply_masks(ref_model, masks[0]):
            reference_score(ref_model, batch, utility)
        fast, reference, fast_s, reference_s = [], [], 0.0, 0.0
        # Alternate the two paths group by group, so load from other jobs hits both alike.
        for start in range(0, len(masks), per_forward):
            group = masks[start : start + per_forward]
            values, seconds = timed(
                lambda g=group, u=utility: score_masks(
                    adapter, fast_model, u, batch, g, per_forward, False
                )
            )
            fast += values.tolist()
            fast_s += seconds
            for keep in group:
                with adapter.apply_masks(ref_model, keep):
                    value, seconds = timed(
                        lambda f=reference_score, u=utility: f(ref_model, batch, u)
                    )
                reference.append(value)
                reference_s += seconds
        figures[name] = {
            "fast_evals_per_s": len(masks) / fast_s,
            "reference_evals_per_s": len(masks) / reference_s,
            "eval_speedup_vs_reference": reference_s / fast_s,
            "utility_rank_corr": spearman(fast, reference),
            "fast_s_per_eval": fast_s / len(masks),
        }
        if name == "perplexity":
            # each problem's rows run unpadded; the reference pads and projects every position
            flops = evaluation_flops(adapter, fast_model, batch, padded=False)
            reference_flops = evaluation_flops(adapter, fast_model, batch, padded=True)
            total = sum(flops.values())
            figures[name]["model_gflops_per_s"] = total * len(masks) / fast_s / 1e9
            figures[name]["body_flops_per_eval"] = flops["body"] + flops["attention"]
            figures[name]["head_flops_per_eval"] = flops["head"]
            figures[name]["attention_share_of_flops"] = flops["attention"] / total
            # the speed-up that computing less gives at equal FLOP/s: the ceiling of a
            # FLOP-bound evaluation against a reference running at the same efficiency
            figures[name]["flop_ratio_vs_reference"] = sum(reference_flops.values()) / total
    figures["round_overhead"] = _round_overhead(
        adapter, fast_model, batch, generator, tokenizer, masks[0]
    )
    return figures


def _round_overhead(adapter, model, batch, generator, tokenizer, keep: torch.Tensor) -> dict:
    """Seconds a round spends outside sub-model evaluation at Bonsai's budget: the prior's
    forward passes (on ``batch``), a ridge fit on Bonsai's 200 masks over the candidates
    that a 5% round leaves (random data: the fit's cost depends only on the shape), and the
    default compensation before the slice (``keep``, on a copy of the model)."""
    import copy

    from bonsai_prune.config import PruneConfig
    from bonsai_prune.core.priors import fixed_units
    from bonsai_prune.core.regression import fit_importance
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.methods.base import compensation_for
    from bonsai_prune.methods.forward import unit_prior
    from bonsai_prune.models.compensation import refit_outputs

    layout = adapter.layout(model)
    prior, prior_s = timed(lambda: unit_prior(adapter, model, batch, "wanda", generator))
    n_candidates = int(
        (~fixed_units(prior, layout.module_index, BONSAI_BUDGET["prune_fraction"])).sum()
    )
    masks = torch.rand((BONSAI_BUDGET["masks_per_round"], n_candidates), generator=generator) < 0.5
    scores = torch.randn(masks.shape[0], generator=generator, dtype=torch.float64)
    _, regression_s = timed(lambda: fit_importance(masks, scores))
    compensation = compensation_for(model, tokenizer, load_gsm8k("train"), PruneConfig())
    scratch = copy.deepcopy(model)  # the refit writes the weights the other timings use
    _, compensation_s = timed(lambda: refit_outputs(adapter, scratch, keep, compensation))
    return {
        "prior_s": prior_s,
        "prior_problems": int(batch.input_ids.shape[0]),
        "regression_s": regression_s,
        "compensation_s": compensation_s,
        "n_candidates": n_candidates,
    }


BONSAI_BUDGET = {
    "sparsity": 0.5,
    "prune_fraction": 0.05,
    "masks_per_round": 200,
    "calib_samples": 8,
}


def project_search(
    seconds_per_eval: float,
    problems_measured: int,
    body_flops: float,
    head_flops: float,
    peak_flops_per_s: float,
    overhead: dict,
    budget: dict = BONSAI_BUDGET,
) -> dict:
    """Time to prune to ``budget["sparsity"]`` with Bonsai's budget, projected from measured
    per-evaluation and per-round costs, and the lower bound the evaluations' FLOPs set at the
    measured matmul peak.

    Round r (0-based) starts with ``1 - r * prune_fraction`` of the non-embedding parameters;
    the body's share of an evaluation's cost shrinks with them, the LM head's does not. Costs
    measured on ``problems_measured`` calibration problems scale linearly to the budget's;
    compensation (``overhead["compensation_s"]``, one measured refit) shrinks with the body.
    """
    rounds = math.ceil(round(budget["sparsity"] / budget["prune_fraction"], 9))
    per_problem = budget["calib_samples"] / problems_measured
    prior_scale = budget["calib_samples"] / overhead["prior_problems"]
    total = bound = evaluation = 0.0
    for r in range(rounds):
        left = 1 - r * budget["prune_fraction"]
        share = (body_flops * left + head_flops) / (body_flops + head_flops)
        evals = budget["masks_per_round"] * seconds_per_eval * per_problem * share
        evaluation += evals
        total += evals + overhead["prior_s"] * prior_scale * left + overhead["regression_s"]
        total += overhead.get("compensation_s", 0.0) * left
        bound += budget["masks_per_round"] * (body_flops * left + head_flops) * per_problem
    bound /= peak_flops_per_s
    return {
        "budget": dict(budget),
        "rounds": rounds,
        "evaluations": rounds * budget["masks_per_round"],
        "projected_s": total,
        "projected_evaluation_s": evaluation,
        "flops_lower_bound_s": bound,
        "projected_over_lower_bound": total / bound,
        "projected": True,
    }
