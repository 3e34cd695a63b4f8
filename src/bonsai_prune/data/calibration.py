"""Calibration batches: the problems one round scores every sub-model on, tokenised once.

Teacher-forced utilities read prompt + reference solution (loss on the solution tokens only);
generating utilities read the prompts alone, left-padded. Both views are built here, once per
round, so no sub-model re-tokenises anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bonsai_prune.data.problems import Problem, sample_problems
from bonsai_prune.data.prompts import exemplars, format_prompt, worked_solution


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


def calibration_problems(pool: list[Problem], n: int, seed: int, index: int) -> list[Problem]:
    """Round ``index``'s fixed calibration problems: the same for every sub-model of the round."""
    return sample_problems(pool, n, seed=seed * 7919 + index)


def batch_maker(
    tokenizer,
    pool: list[Problem],
    *,
    n: int,
    seed: int,
    prompt: str = "chat",
    shots: int = 0,
    max_length: int = 768,
    device: torch.device | str = "cpu",
) -> Callable[[int], CalibrationBatch]:
    """``index -> CalibrationBatch``: round ``index``'s problems from ``pool``, tokenised."""

    def make(index: int) -> CalibrationBatch:
        problems = calibration_problems(pool, n, seed, index)
        return build_batch(
            tokenizer, problems, prompt=prompt, shots=shots, max_length=max_length, device=device
        )

    return make
