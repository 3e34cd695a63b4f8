"""The utilities' fast paths equal the computations they replace."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer

from bonsai_prune.bench.reference import reference_perplexity
from bonsai_prune.config import UtilityConfig
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.models import adapter_for
from bonsai_prune.utility import resolve_utility
from bonsai_prune.utility.base import UTILITIES, solution_nll
from bonsai_prune.utility.perplexity import PerplexityUtility
from bonsai_prune.utility.references import prepare_self_references


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


# --- contract: a utility that batches sub-models scores each as it would alone ---------------


@pytest.mark.parametrize(
    "name", [n for n in UTILITIES.names() if hasattr(UTILITIES.get(n), "score_masks")]
)
def test_batched_sub_models_score_as_each_alone(model_and_batch, name):
    """Every registered utility with ``score_masks`` (several sub-models per forward) gives
    each sub-model the score its own masked call gives, on problems of different lengths."""
    model, batch = model_and_batch
    utility = resolve_utility(UtilityConfig(name=name, gen_tokens=6))
    prepare_self_references(utility, model, batch.tokenizer, batch.problems)
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(3, adapter.layout(model).n_units, generator=generator) > 0.4  # (3, U)
    masks[0] = True  # the unmasked model among them

    batched = utility.score_masks(model, batch, masks, lambda k: adapter.apply_masks(model, k))
    alone = []
    for keep in masks:
        with adapter.apply_masks(model, keep):
            alone.append(utility(model, batch))
    assert len(set(round(v, 6) for v in alone)) == 3, "the masks did not change the utility"
    assert batched == pytest.approx(alone, abs=1e-4)


def test_the_answer_forwards_prefill_generation_as_a_prefill_would(model_and_batch):
    """U†'s teacher-forced forwards over prompt + solution leave each prompt's K/V in the lean
    decoder: the continuation and the answer NLL equal those of a separate prefill."""
    from bonsai_prune.models.decoding import prefill_decoder
    from bonsai_prune.utility.base import prompt_lengths, sub_model_nll, sub_model_nll_and_prompts
    from bonsai_prune.utility.generation import greedy_sequences

    model, batch = model_and_batch
    adapter = adapter_for(model)
    masks = torch.rand(2, adapter.layout(model).n_units, generator=torch.Generator().manual_seed(2))
    masks = masks > 0.3  # (G=2, U)
    n, tokens = len(batch.problems), 8
    prompts = prompt_lengths(batch)
    assert prompts is not None and len(set(prompts)) > 1  # left padding inside the batch
    decoder = prefill_decoder(model, 2 * n, batch.prompt_ids.shape[1] + tokens)
    for buffer in decoder.k + decoder.v:  # what uninitialised memory may hold: padding
        buffer.fill_(float("nan"))  # slots must be overwritten, masking alone keeps NaN
    with adapter.apply_masks(model, masks):
        nll, logits = sub_model_nll_and_prompts(
            model, batch, 2, batch.answer_mask, decoder, prompts
        )
        expected_nll = sub_model_nll(model, batch, 2, batch.answer_mask)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-5)
    ids, attention = batch.prompt_ids.repeat(2, 1), batch.prompt_attention_mask.repeat(2, 1)
    pad = batch.tokenizer.pad_token_id
    with adapter.apply_masks(model, masks.repeat_interleave(n, dim=0)):
        prefilled = greedy_sequences(
            model, ids, attention, tokens, pad_token_id=pad, prefilled=(decoder, logits)
        )
        plain = greedy_sequences(model, ids, attention, tokens, pad_token_id=pad)
    assert torch.equal(prefilled, plain)
    assert not torch.equal(plain[:n], plain[n:])  # the two sub-models differ


def test_a_prompt_cut_to_fit_is_not_taken_from_the_answer_forwards(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    problems = load_gsm8k("train")[:2]
    assert build_batch(tokenizer, problems).prompt_ids.shape[1] > 60
    from bonsai_prune.utility.base import prompt_lengths

    assert prompt_lengths(build_batch(tokenizer, problems)) is not None
    assert prompt_lengths(build_batch(tokenizer, problems, max_length=60)) is None
