"""Sampling that stops once the round's selection is stable (`--stop-agreement`)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_for

from bonsai_prune import PruneConfig, UtilityConfig
from bonsai_prune.methods import METHODS
from bonsai_prune.methods.base import PruneContext
from bonsai_prune.methods.bonsai import jaccard, score_until_stable

MASKS = torch.rand((32, 50), generator=torch.Generator().manual_seed(0)) < 0.5  # (N, U)


class Recorder:
    """A fake scorer (the mask's number of kept units) that records what it was asked."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        self.calls.append(masks)
        return masks.sum(1).double()


def deciding(removals: list[torch.Tensor]):
    """A fake ``decide`` whose k-th call removes ``removals[k]``."""
    calls = iter(removals)
    return lambda masks, scores: (None, None, None, SimpleNamespace(keep=~next(calls)))


def units(*indices: int) -> torch.Tensor:
    out = torch.zeros(50, dtype=torch.bool)
    out[list(indices)] = True
    return out


def test_off_scores_every_mask_at_once():
    scorer = Recorder()
    scores, info = score_until_stable(MASKS, scorer, None, PruneConfig())
    assert len(scorer.calls) == 1 and scores.numel() == 32 and info["stopped"] == "budget"


def test_a_stable_selection_stops_after_two_checks_on_the_first_masks():
    scorer = Recorder()
    config = PruneConfig(stop_agreement=0.9, masks_per_check=8)
    same = [units(1, 2, 3)] * 4
    scores, info = score_until_stable(MASKS, scorer, deciding(same), config)
    assert info == {"n_scored": 16, "stopped": "stable", "agreements": [1.0]}
    assert torch.equal(torch.cat(scorer.calls), MASKS[:16])  # the first masks, in order
    assert torch.equal(scores, MASKS[:16].sum(1).double())


def test_an_unstable_selection_scores_up_to_the_maximum():
    config = PruneConfig(stop_agreement=0.9, masks_per_check=8)
    changing = [units(1, 2), units(3, 4), units(1, 2), units(3, 4)]
    scores, info = score_until_stable(MASKS, Recorder(), deciding(changing), config)
    assert scores.numel() == 32 and info["stopped"] == "budget"
    assert info["agreements"] == [0.0, 0.0]  # checks at 8, 16 and 24 masks; none after 32


def test_jaccard():
    assert jaccard(units(1, 2, 3), units(2, 3, 4)) == pytest.approx(0.5)
    assert jaccard(units(), units()) == 1.0


def test_a_round_that_stops_early_reaches_the_target_and_records_why(tokenizer):
    config = PruneConfig(
        sparsity=0.2,
        calib_samples=2,
        masks_per_round=16,
        masks_per_check=4,
        stop_agreement=0.5,
        tolerance=0.01,
        utility=UtilityConfig(max_length=192),
    )
    full = METHODS.get("bonsai")(
        PruneContext.create(tiny_llama_for(tokenizer), tokenizer, replace(config, stop_agreement=0))
    )
    early = METHODS.get("bonsai")(PruneContext.create(tiny_llama_for(tokenizer), tokenizer, config))
    for result in (full, early):
        assert abs(result.sparsity - 0.2) <= 0.01
    sampling = [r["sampling"] for r in early.round_figures]
    assert all(s["stopped"] in ("stable", "budget") for s in sampling)
    assert all(4 <= s["n_scored"] <= 16 and s["n_scored"] % 4 == 0 for s in sampling)
    assert [r["sampling"]["n_scored"] for r in full.round_figures] == [16] * len(full.round_figures)
