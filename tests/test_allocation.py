"""Module-level importance: one column per module, the prior within each (core/allocation)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_for
from scipy.stats import spearmanr

from bonsai_prune import PruneConfig, UtilityConfig
from bonsai_prune.core.allocation import module_design, module_importance
from bonsai_prune.core.regression import fit_importance
from bonsai_prune.core.sampling import sample_masks
from bonsai_prune.methods import METHODS
from bonsai_prune.methods.base import PruneContext


def test_design_is_the_share_of_each_modules_candidate_parameters_kept():
    module_index = torch.tensor([0, 0, 0, 1, 1])
    costs = torch.tensor([1.0, 1.0, 2.0, 10.0, 30.0])
    candidates = torch.tensor([True, True, True, False, True])  # module 1: one candidate
    masks = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    design, modules = module_design(masks, candidates, module_index, costs)
    assert modules.tolist() == [0, 1]
    assert torch.allclose(design, torch.tensor([[0.75, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_importance_orders_modules_by_gamma_per_parameter_and_units_by_the_prior():
    module_index = torch.tensor([0, 0, 1, 1, 1])
    costs = torch.tensor([10.0, 10.0, 1.0, 1.0, 1.0])
    candidates = torch.tensor([True, True, True, True, False])
    prior = torch.tensor([5.0, 1.0, 0.3, 0.1, 9.0])
    score = module_importance(
        torch.tensor([4.0, 0.3]), torch.tensor([0, 1]), candidates, module_index, costs, prior
    )
    assert score[4] == float("inf")  # not a candidate
    assert score[1] < score[0] and score[3] < score[2]  # within a module: the prior's order
    # per parameter: module 0 loses 4 / 20 = 0.2 per parameter on average, module 1 0.15
    assert float(score[:2].mean()) == pytest.approx(0.2)
    assert float(score[2:4].mean()) == pytest.approx(0.15)


def test_graded_masks_let_32_sub_models_rank_twelve_modules():
    generator = torch.Generator().manual_seed(3)
    module_index = torch.arange(12).repeat_interleave(40)  # (480,)
    costs = torch.ones(480)
    prior = torch.rand(480, generator=generator, dtype=torch.float64)
    fixed = torch.zeros(480, dtype=torch.bool)
    masks = sample_masks(prior, fixed, module_index, 0.5, 16, generator=generator,
                         removal_counts="graded")  # fmt: skip
    true_gamma = torch.linspace(0.1, 2.0, 12, dtype=torch.float64)
    design, modules = module_design(masks, ~fixed, module_index, costs)
    scores = design @ true_gamma + 0.02 * torch.randn(32, generator=generator, dtype=torch.float64)
    fit = fit_importance(design, scores)
    assert spearmanr(fit.beta.numpy(), true_gamma.numpy()).statistic > 0.9


def test_bonsai_with_module_regression_reaches_the_target(tokenizer):
    config = PruneConfig(
        sparsity=0.2,
        calib_samples=2,
        regression="modules",
        tolerance=0.01,
        utility=UtilityConfig(max_length=192),
    )
    result = METHODS.get("bonsai")(
        PruneContext.create(tiny_llama_for(tokenizer), tokenizer, config, progress=False)
    )
    assert abs(result.sparsity - 0.2) <= 0.01
