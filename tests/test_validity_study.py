"""Round-1 validity of several utilities at once, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.study.validity import measure_validity


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.padding_side = "left"
    return tok


def untied_tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_measure_validity_scores_every_variant_on_shared_generations(tokenizer):
    lexical = UtilityConfig(name="comprehensive", weights={"lex": 100}, gen_tokens=8)
    short = UtilityConfig(
        name="comprehensive", weights={"lex": 100}, gen_tokens=3, reference="gold_prefix"
    )
    config = PruneConfig(masks_per_round=4, calib_samples=2, prune_fraction=0.2, utility=lexical)
    variants = [("perplexity", None), ("lex self", lexical), ("lex gold prefix, 3", short)]
    result = measure_validity(
        config, variants, model=untied_tiny_llama(tokenizer), tokenizer=tokenizer
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
