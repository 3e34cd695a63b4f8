"""Round-1 validity of several utilities at once, on a tiny random model."""

from __future__ import annotations

import pytest
from conftest import tiny_llama_over

from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.study.validity import measure_validity


def test_measure_validity_scores_every_variant_on_shared_generations(tokenizer):
    lexical = UtilityConfig(name="comprehensive", weights={"lex": 100}, gen_tokens=8)
    short = UtilityConfig(
        name="comprehensive", weights={"lex": 100}, gen_tokens=3, reference="gold_prefix"
    )
    config = PruneConfig(masks_per_round=4, calib_samples=2, prune_fraction=0.2, utility=lexical)
    variants = [("perplexity", None), ("lex self", lexical), ("lex gold prefix, 3", short)]
    result = measure_validity(
        config, variants, model=tiny_llama_over(tokenizer, seed=1, tied=False), tokenizer=tokenizer
    )
    rows = {row["name"]: row for row in result["variants"]}
    assert list(rows) == ["perplexity", "lex self", "lex gold prefix, 3"]
    assert result["n_masks"] == 4 and result["n_problems"] == 2
    # the unmasked model writes its own self references: a perfect lexical match
    assert rows["lex self"]["unmasked"] == pytest.approx(100.0)
    assert rows["lex self"]["share_beaten"] >= 0.5  # nothing scores above it; ties count half
    for row in rows.values():
        assert 0.0 <= row["share_beaten"] <= 1.0
        assert row["sub_model_min"] <= row["sub_model_mean"] <= row["sub_model_max"]
    assert rows["perplexity"]["unmasked"] < 0  # -mean NLL
