"""Validity of a round's utility, and the prior fallback when it carries no signal."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_llama

from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.core.selection import select_units
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.methods.bonsai import round_generator, run_round
from bonsai_prune.methods.forward import unit_prior
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.utility.validity import (
    UtilityWarning,
    held_out_r2,
    measure_validity,
    prior_tiebreak,
    share_beaten,
    spearman,
)

# --- pure figures ------------------------------------------------------------------------------


def test_share_beaten_counts_ties_half():
    scores = torch.tensor([1.0, 2.0, 3.0, 3.0])
    assert share_beaten(3.0, scores) == pytest.approx((2 + 1) / 4)
    assert share_beaten(0.0, scores) == 0.0
    assert share_beaten(9.0, scores) == 1.0


def test_spearman_is_rank_based_and_nan_when_constant():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(4)))


def test_held_out_r2():
    scores = torch.tensor([0.0, 2.0])  # variance 1
    assert held_out_r2(0.25, scores) == pytest.approx(0.75)
    assert held_out_r2(1.5, scores) == pytest.approx(-0.5)
    assert math.isnan(held_out_r2(0.0, torch.ones(3)))


def test_a_utility_that_sees_damage_is_informative():
    removed = torch.arange(10.0)
    scores = 10.0 - removed + 0.1 * torch.tensor([1, -1] * 5)
    validity = measure_validity(11.0, scores, removed, cv_error=0.05)
    assert validity.share_beaten == 1.0 and validity.rank_correlation < -0.9
    assert validity.informative and not validity.no_signal
    assert validity.warning(1) is None


def test_the_first_studys_failure_is_flagged():
    # the unmasked model below most of its sub-models, scores rising with damage
    removed = torch.arange(10.0)
    scores = 5.0 + removed
    validity = measure_validity(6.0, scores, removed, cv_error=20.0, at_max_penalty=True)
    assert validity.share_beaten == pytest.approx(0.15) and validity.rank_correlation > 0
    assert not validity.informative and validity.no_signal  # R^2 < 0 at the heaviest penalty
    message = validity.warning(3)
    assert message.startswith("round 3:") and "15%" in message and "prior" in message


def test_a_poor_fit_at_a_moderate_penalty_still_counts_as_signal():
    # perplexity in round 1: betas that do not predict held-out sub-models (R^2 < 0), chosen
    # at a moderate penalty, with a clear rank correlation
    removed = torch.arange(10.0)
    validity = measure_validity(1.0, -removed, removed, cv_error=20.0, at_max_penalty=False)
    assert validity.held_out_r2 < 0 and not validity.no_signal and validity.informative


def test_constant_scores_have_no_signal():
    validity = measure_validity(0.0, torch.zeros(6), torch.arange(6.0), cv_error=0.0)
    assert validity.constant and validity.no_signal and not validity.informative
    assert validity.to_dict()["rank_correlation"] is None  # JSON-safe


def test_prior_tiebreak_ranks_within_each_module():
    prior = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0])
    module_index = torch.tensor([0, 0, 0, 1, 1])
    assert prior_tiebreak(prior, module_index).tolist() == pytest.approx(
        [2 / 3, 0.0, 1 / 3, 0.0, 0.5]
    )


def test_tied_betas_are_removed_by_prior_rank_not_by_position():
    # two modules of 4 units; all betas tie; the prior says the last units matter least
    prior = torch.tensor([4.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0, 1.0])
    module_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    beta, costs = torch.zeros(8), torch.ones(8)
    floors = torch.ones(2, dtype=torch.long)
    by_index = select_units(beta, costs, 2, module_index, floors).keep
    assert by_index.tolist() == [False, False, True, True, True, True, True, True]
    by_prior = select_units(
        beta, costs, 2, module_index, floors, tiebreak=prior_tiebreak(prior, module_index)
    ).keep
    assert by_prior.tolist() == [True, True, True, False, True, True, True, False]


# --- a round with a constant utility -------------------------------------------------------------


def test_a_constant_utility_prunes_by_the_prior_within_modules_and_warns(tokenizer):
    model = tiny_llama(seed=5)
    model.resize_token_embeddings(len(tokenizer))
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    config = PruneConfig(
        sparsity=0.2,
        prune_fraction=0.2,
        masks_per_round=8,
        calib_samples=2,
        utility=UtilityConfig(name="perplexity"),
    )
    batch = build_batch(tokenizer, load_gsm8k("train")[:2])
    prior = unit_prior(adapter, copy.deepcopy(model), batch, "wanda", round_generator(0, 1))
    n_original = adapter.count_parameters(model)
    with pytest.warns(UtilityWarning, match="round 1: .* selecting by the prior"):
        result = run_round(
            1, model, adapter, lambda m, b: 1.0, batch, config, n_original, progress=False
        )
    assert result.validity["constant"] and result.validity["selected_by"] == "prior"
    json.dumps(result.figures())  # the round's figures go to report.json
    removed_per_module = 0
    for module, keep in layout.split(result.keep):
        module_prior = prior[module.units]
        removed = ~keep
        if bool(removed.any()):
            removed_per_module += 1
            # every removed unit ranks below every kept one by the prior
            assert float(module_prior[removed].max()) <= float(module_prior[keep].min())
    assert removed_per_module == len(layout.modules)  # spread over every module, not layer 0
