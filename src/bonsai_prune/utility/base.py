"""The utility contract and the calibration batch every utility scores on.

A utility maps a (virtually masked) model and a calibration batch to one number, higher is
better. Named utilities are classes registered in ``UTILITIES``; any Python callable
``(model, batch) -> float`` works too and receives the same :class:`CalibrationBatch`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bonsai_prune.core.row_blocks import by_row_blocks
from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.registry import Registry

UTILITIES: Registry[type] = Registry("utility")


class Utility(Protocol):
    """Scores one sub-model on a calibration batch; higher is better."""

    def __call__(self, model, batch: CalibrationBatch) -> float: ...


@torch.no_grad()
def solution_nll(model, batch: CalibrationBatch, rows_per_chunk: int = 4) -> torch.Tensor:
    """Mean negative log-likelihood of the reference solution tokens, per problem (n,).

    NaN for a problem with no solution token to score (never 0, which would be a perfect score).

    Runs the decoder once and applies the LM head only at the scored positions: the
    full-vocabulary projection at every position would be about a fifth of the work, wasted.
    Rows are grouped by length and each chunk is cut to its longest row, so little padding is
    computed (a third of a padded GSM8K batch is padding). Running rows one by one computes
    none but was slower and erratic on 2 CPU cores (many small kernels); chunks of 4 were not.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    lengths = batch.attention_mask.sum(1)  # (n,) right padding: real tokens come first
    order = torch.argsort(lengths, descending=True, stable=True)
    nll = torch.empty(len(order), device=batch.input_ids.device)
    for start in range(0, len(order), rows_per_chunk):
        rows = order[start : start + rows_per_chunk]
        width = int(lengths[rows].max())
        ids = batch.input_ids[rows, :width]
        attn = batch.attention_mask[rows, :width]
        target = batch.target_mask[rows, :width]
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state  # (b, L, H)
        nll[rows] = _target_nll(head, hidden, ids, target)
    return nll


def token_nlls(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (n,) in fp32 of ``labels`` (n,) under ``logits`` (n, V), a block of rows at a
    time (:mod:`bonsai_prune.core.row_blocks`: 1,200 rows of the packaged model's vocabulary
    150 -> 65 ms, the same values)."""
    return by_row_blocks(_row_nll, logits, labels)


def _row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


@torch.no_grad()
def row_nll(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean NLL (B,) of the tokens after the ``target_mask`` positions, one forward of all rows.

    Unlike ``solution_nll`` it keeps the rows together, so a keep mask of shape (B, U) applied
    around it gives every row its own sub-model. NaN for a row without a target. Rows without
    padding pass ``attention_mask=None``: attention then runs its plain causal kernel.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    return _target_nll(
        model.get_output_embeddings(), hidden.last_hidden_state, input_ids, target_mask
    )


def _target_nll(head, hidden, input_ids, target_mask) -> torch.Tensor:
    """Mean NLL (B,) of the tokens after the ``target_mask`` positions, from the last hidden
    states (B, L, H): the LM head only where a token is scored."""
    logits = head(hidden[target_mask])  # (n_scored, V)
    labels = torch.roll(input_ids, shifts=-1, dims=1)[target_mask]  # (n_scored,)
    token_nll = token_nlls(logits, labels)
    row = torch.nonzero(target_mask)[:, 0]  # (n_scored,) which row each scored token is in
    sums = torch.zeros(input_ids.shape[0], device=input_ids.device).index_add_(0, row, token_nll)
    counts = target_mask.sum(1)  # (B,)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


@torch.no_grad()
def sub_model_nll(
    model, batch: CalibrationBatch, groups: int, target_mask: torch.Tensor
) -> torch.Tensor:
    """Mean NLL (G, n) of the tokens after the ``target_mask`` (n, L) positions of each problem
    under each of G sub-models, whose keep masks (G, U) the caller applies around the call.

    One forward per problem, row g running sub-model g: every row of a forward has the
    problem's length, so no padding is computed, and G rows through the same weights make a
    larger matrix product than one sub-model's problems would. Right padding assumed.
    """
    nll = torch.empty(groups, len(batch.problems), dtype=torch.float32)
    for i, ids, target in _problem_rows(batch, groups, target_mask):
        nll[:, i] = row_nll(model, ids, None, target).float().cpu()
    return nll


def _problem_rows(batch: CalibrationBatch, groups: int, target_mask: torch.Tensor):
    """(i, ids (G, L_i), target (G, L_i)) per problem: its unpadded row, once per sub-model."""
    for i, length in enumerate(batch.attention_mask.sum(1).tolist()):
        rows = slice(i, i + 1), slice(0, length)
        yield (
            i,
            batch.input_ids[rows].expand(groups, length),
            target_mask[rows].expand(groups, length),
        )


def prompt_lengths(batch: CalibrationBatch) -> list[int] | None:
    """Each problem's prompt length, when every teacher-forced row (``input_ids``) starts with
    its whole prompt (``prompt_ids``); None where one does not (a long prompt's start is cut to
    fit ``max_length``)."""
    width = batch.prompt_ids.shape[1]
    lengths = batch.prompt_attention_mask.sum(1).tolist()
    for i, length in enumerate(lengths):
        prompt = batch.prompt_ids[i, width - length :]
        if length > batch.input_ids.shape[1] or not torch.equal(
            batch.input_ids[i, :length], prompt
        ):
            return None
    return lengths


@torch.no_grad()
def sub_model_nll_and_prompts(
    model, batch: CalibrationBatch, groups: int, target_mask: torch.Tensor, decoder, prompts
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sub_model_nll`, whose forwards also fill the lean ``decoder``
    (``models.decoding.prefill_decoder``) with every prompt's K/V, at rows g * n + i as
    generation lays them out (prompts repeated per sub-model); returns the NLL (G, n) and the
    logits (G * n, V) after each prompt. The teacher-forced rows begin with the prompts
    (``prompts``: their lengths, :func:`prompt_lengths`) and attention is causal, so the
    prompts' K/V are those a prefill would compute: U† runs each prompt once, not twice.
    """
    from transformers import DynamicCache

    from bonsai_prune.models.decoding import cache_keyword

    body, head = model.get_decoder(), model.get_output_embeddings()
    keyword = cache_keyword(body)
    n, width = len(batch.problems), batch.prompt_ids.shape[1]
    nll = torch.empty(groups, n, dtype=torch.float32)
    after_prompts = []  # per problem (G, V)
    for i, ids, target in _problem_rows(batch, groups, target_mask):
        cache = DynamicCache()
        hidden = body(input_ids=ids, use_cache=True, **{keyword: cache}).last_hidden_state
        nll[:, i] = _target_nll(head, hidden, ids, target).float().cpu()
        after_prompts.append(head(hidden[:, prompts[i] - 1]))
        decoder.load_rows(slice(i, None, n), cache, prompts[i], width)  # rows g * n + i
        del cache
    return nll, torch.stack(after_prompts, dim=1).flatten(0, 1)  # (G, n, V) -> row g * n + i


def answer_probability(model, batch: CalibrationBatch) -> torch.Tensor:
    """Probability (n,) of the gold final answer after the question and the gold reasoning.

    Teacher forced: the model reads prompt + reference solution and is scored on the tokens of
    the answer after '####', as the geometric mean of their probabilities (exp of minus the mean
    NLL), so the value lies in [0, 1] whatever the answer's length; NaN where the answer did not
    fit in ``max_length``. Several sub-models at once: :func:`sub_model_nll` on
    ``batch.answer_mask``.
    """
    return torch.exp(-row_nll(model, batch.input_ids, batch.attention_mask, batch.answer_mask))
