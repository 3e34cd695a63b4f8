"""The perplexity utility's fast path equals the full-logits computation it replaces."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer

from bonsai_prune.bench import reference_perplexity
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.utility.base import solution_nll
from bonsai_prune.utility.perplexity import PerplexityUtility


@pytest.fixture(scope="module")
def model_and_batch(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = tiny_llama(seed=3)
    model.resize_token_embeddings(len(tokenizer))
    problems = load_gsm8k("train")[:5]  # different lengths: padding inside every chunk
    return model, build_batch(tokenizer, problems)


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 4, 8])
def test_solution_nll_matches_full_logits(model_and_batch, rows_per_chunk):
    model, batch = model_and_batch
    assert batch.attention_mask.sum() < batch.attention_mask.numel(), "batch has no padding"
    fast = solution_nll(model, batch, rows_per_chunk)  # (n,)
    assert fast.shape == (5,) and bool(torch.isfinite(fast).all())
    assert -float(fast.mean()) == pytest.approx(reference_perplexity(model, batch), abs=1e-4)


def test_perplexity_utility_is_negative_mean_nll(model_and_batch):
    model, batch = model_and_batch
    assert PerplexityUtility()(model, batch) == pytest.approx(
        -float(solution_nll(model, batch).mean())
    )
