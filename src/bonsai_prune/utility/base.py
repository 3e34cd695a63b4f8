"""The utility contract and the calibration batch every utility scores on.

A utility maps a (virtually masked) model and a calibration batch to one number, higher is
better. Named utilities are classes registered in ``UTILITIES``; any Python callable
``(model, batch) -> float`` works too and receives the same :class:`CalibrationBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..data import Problem
from ..prompts import exemplars, format_prompt, worked_solution
from ..registry import Registry

UTILITIES: Registry[type] = Registry("utility")


@dataclass
class CalibrationBatch:
    """Calibration problems, tokenised once per round and shared by every sub-model."""

    problems: list[Problem]
    prompts: list[str]
    input_ids: torch.Tensor  # (n, L) prompt + reference solution, right-padded
    attention_mask: torch.Tensor  # (n, L)
    target_mask: torch.Tensor  # (n, L) bool: positions whose *next* token is a solution token
    answer_mask: torch.Tensor  # (n, L) bool: positions whose next token is a final-answer token
    prompt_ids: torch.Tensor  # (n, P) prompts alone, left-padded, for generation
    prompt_attention_mask: torch.Tensor  # (n, P)
    tokenizer: object

    @property
    def n_target_tokens(self) -> int:
        return int(self.target_mask.sum())


def fit_length(prompt_ids: list[int], solution_ids: list[int], max_length: int) -> list[int]:
    """Prompt + solution in at most ``max_length`` tokens, every solution token kept if possible.

    The prompt loses tokens from the left first (down to one), then the solution its tail.
    Cutting from the right, as this used to, left a long prompt with no solution token to
    score, and a problem with nothing to score counted as a perfect NLL of 0.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    overflow = len(prompt_ids) + len(solution_ids) - max_length
    if overflow > 0:
        prompt_ids = prompt_ids[min(overflow, len(prompt_ids) - 1) :]
    return (prompt_ids + solution_ids)[:max_length]


def answer_token_flags(tokenizer, solution: str) -> tuple[list[int], list[bool]]:
    """Token ids of a worked solution and, per token, whether it spells the final answer.

    The final answer is the text after the last '####'; a token counts if it overlaps it
    (" 18" starts at the space but carries the answer).
    """
    encoded = tokenizer(solution, add_special_tokens=False, return_offsets_mapping=True)
    marker = solution.rfind("####")
    start = len(solution) if marker < 0 else marker + 4
    start += len(solution[start:]) - len(solution[start:].lstrip())
    flags = [end > start and start < len(solution) for _, end in encoded["offset_mapping"]]
    return encoded["input_ids"], flags


def build_batch(
    tokenizer,
    problems: list[Problem],
    *,
    prompt: str = "chat",
    shots: int = 0,
    max_length: int = 768,
    device: torch.device | str = "cpu",
) -> CalibrationBatch:
    """Tokenise prompt + reference solution for teacher forcing (loss on solution tokens only)."""
    shot_problems = exemplars(shots)
    prompts = [format_prompt(tokenizer, p.question, prompt, shot_problems) for p in problems]
    rows, targets, answers = [], [], []
    for text, problem in zip(prompts, problems, strict=True):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        solution_ids, is_answer = answer_token_flags(tokenizer, worked_solution(problem))
        ids = fit_length(prompt_ids, solution_ids, max_length)
        n_solution = min(len(solution_ids), len(ids) - 1)  # solution tokens that fit
        n_prompt = len(ids) - n_solution
        # position t predicts token t+1: targets are the positions just before solution tokens
        target = [n_prompt - 1 <= t < len(ids) - 1 for t in range(len(ids))]
        answer = [
            t + 1 >= n_prompt and t + 1 < len(ids) and is_answer[t + 1 - n_prompt]
            for t in range(len(ids))
        ]
        rows.append(ids)
        targets.append(target)
        answers.append(answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, target, answer) in enumerate(zip(rows, targets, answers, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target_mask[i, : len(ids)] = torch.tensor(target)
        answer_mask[i, : len(ids)] = torch.tensor(answer)
    tokenizer.padding_side = "left"
    prompt_batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    return CalibrationBatch(
        problems,
        prompts,
        input_ids.to(device),
        attention.to(device),
        target_mask.to(device),
        answer_mask.to(device),
        prompt_batch["input_ids"].to(device),
        prompt_batch["attention_mask"].to(device),
        tokenizer,
    )


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
        logits = head(hidden[target]).float()  # (n_scored, V)
        labels = torch.roll(ids, shifts=-1, dims=1)[target]  # (n_scored,)
        token_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        row = torch.nonzero(target)[:, 0]  # which problem of the chunk each scored token is
        sums = torch.zeros(len(rows), device=ids.device).index_add_(0, row, token_nll)
        counts = target.sum(1)  # (b,)
        nll[rows] = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
    return nll


@torch.no_grad()
def row_nll(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Mean NLL (B,) of the tokens after the ``target_mask`` positions, one forward of all rows.

    Unlike ``solution_nll`` it keeps the rows together, so a keep mask of shape (B, U) applied
    around it gives every row its own sub-model. NaN for a row without a target.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = head(hidden[target_mask]).float()  # (n_scored, V)
    labels = torch.roll(input_ids, shifts=-1, dims=1)[target_mask]  # (n_scored,)
    token_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    row = torch.nonzero(target_mask)[:, 0]  # (n_scored,) which row each scored token is in
    sums = torch.zeros(input_ids.shape[0], device=input_ids.device).index_add_(0, row, token_nll)
    counts = target_mask.sum(1)  # (B,)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


def answer_probability(model, batch: CalibrationBatch, repeats: int = 1) -> torch.Tensor:
    """Probability of the gold final answer after the question and the gold reasoning.

    Teacher forced: the model reads prompt + reference solution and is scored on the tokens of
    the answer after '####', as the geometric mean of their probabilities (exp of minus the mean
    NLL), so the value lies in [0, 1] whatever the answer's length. Returns (repeats * n,):
    the batch repeated ``repeats`` times (row i of copy g for sub-model g under a (G*n, U)
    keep mask); NaN where the answer did not fit in ``max_length``.
    """
    ids = batch.input_ids.repeat(repeats, 1)  # (G*n, L)
    attention = batch.attention_mask.repeat(repeats, 1)
    answer = batch.answer_mask.repeat(repeats, 1)
    return torch.exp(-row_nll(model, ids, attention, answer))
