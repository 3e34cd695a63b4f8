"""The bench's pure parts: ratios measured round by round, and when a spread is too wide."""

from __future__ import annotations

import pytest
import torch

from bonsai_prune.bench.evaluation import project_search
from bonsai_prune.bench.measure import MAX_RATIO_SPREAD, ratio_over_rounds
from bonsai_prune.bench.table import ratio_text


def rounds(values: list[float]) -> list[dict]:
    return [{"decode_tokens_per_s": v} for v in values]


def test_ratios_are_taken_within_each_round_then_summarised():
    # the machine slowed down in round 2 for both sides: the per-round ratio is unaffected
    summary = ratio_over_rounds(
        rounds([120, 60, 118]), rounds([100, 50, 100]), "decode_tokens_per_s"
    )
    assert summary["median"] == pytest.approx(1.2)
    assert (summary["min"], summary["max"]) == (pytest.approx(1.18), pytest.approx(1.2))
    assert summary["trusted"] and summary["rounds"] == 3


def test_a_burst_of_load_on_one_side_makes_the_ratio_untrusted():
    summary = ratio_over_rounds(
        rounds([120, 15, 118]), rounds([100, 100, 100]), "decode_tokens_per_s"
    )
    assert (summary["max"] - summary["min"]) / summary["median"] > MAX_RATIO_SPREAD
    assert not summary["trusted"]
    assert "not a result" in ratio_text(summary["median"], summary)
    assert ratio_text(1.2, None) == "1.20x"


def test_projection_shrinks_the_body_with_each_round_and_bounds_by_flops():
    overhead = {"prior_s": 2.0, "prior_problems": 4, "regression_s": 3.0}
    got = project_search(0.5, 4, body_flops=1e9, head_flops=0.0, peak_flops_per_s=1e10,
                         overhead=overhead)  # fmt: skip
    # 10 rounds of 5%; round r keeps 1 - r/20 of the body: sum 7.75; 8 problems = 2x measured
    assert got["rounds"] == 10 and got["evaluations"] == 2000 and got["projected"]
    assert got["projected_evaluation_s"] == pytest.approx(200 * 0.5 * 2 * 7.75)
    assert got["projected_s"] == pytest.approx(got["projected_evaluation_s"] + 2 * 2 * 7.75 + 30)
    assert got["flops_lower_bound_s"] == pytest.approx(200 * 1e9 * 2 * 7.75 / 1e10)
    # compensation before each slice: measured once, shrinking with the body
    compensated = project_search(0.5, 4, 1e9, 0.0, 1e10, {**overhead, "compensation_s": 4.0})
    assert compensated["projected_s"] == pytest.approx(got["projected_s"] + 4.0 * 7.75)


def test_the_lm_head_does_not_shrink():
    overhead = {"prior_s": 0.0, "prior_problems": 8, "regression_s": 0.0}
    head_only = project_search(1.0, 8, 0.0, 1e9, 1e9, overhead)
    assert head_only["projected_evaluation_s"] == pytest.approx(2000.0)


def test_evaluation_flops_count_attention_per_row_and_the_reference_pads(tokenizer):
    from conftest import tiny_llama_for

    from bonsai_prune.bench.evaluation import attention_flops, evaluation_flops
    from bonsai_prune.data.calibration import build_batch
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.models import adapter_for

    model = tiny_llama_for(tokenizer)  # 2 layers of 4 heads x 16 channels
    adapter = adapter_for(model)
    # scores and weighted sum over the causal half, per layer: 2 x 2 x 64 x L(L+1)/2
    assert attention_flops(adapter, model, [3, 1]) == 2 * (2 * 2 * 64 * (6 + 1))
    batch = build_batch(tokenizer, load_gsm8k("train")[:3])
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < batch.attention_mask.shape[1], "no padding to count"
    fast = evaluation_flops(adapter, model, batch, padded=False)
    reference = evaluation_flops(adapter, model, batch, padded=True)
    params = adapter.count_parameters(model)
    assert fast["body"] == 2 * params * int(lengths.sum())
    assert fast["head"] == 2 * 64 * model.config.vocab_size * batch.n_target_tokens
    assert reference["body"] == 2 * params * batch.attention_mask.numel()
    assert reference["attention"] > fast["attention"] and reference["head"] > fast["head"]
    keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
    keep[0] = False  # one head of layer 0
    adapter.slice(model, keep)
    assert attention_flops(adapter, model, [3, 1]) == (2 * 2 * (48 + 64) * 7)
