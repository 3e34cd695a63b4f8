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
    prompt_ids: torch.Tensor  # (n, P) prompts alone, left-padded, for generation
    prompt_attention_mask: torch.Tensor  # (n, P)
    tokenizer: object

    @property
    def n_target_tokens(self) -> int:
        return int(self.target_mask.sum())


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
    rows, targets = [], []
    for text, problem in zip(prompts, problems, strict=True):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        solution_ids = tokenizer(worked_solution(problem), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + solution_ids)[:max_length]
        # position t predicts token t+1: targets are the positions just before solution tokens
        target = [False] * len(ids)
        for t in range(len(prompt_ids) - 1, len(ids) - 1):
            target[t] = True
        rows.append(ids)
        targets.append(target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        target_mask[i, : len(ids)] = torch.tensor(target)
    tokenizer.padding_side = "left"
    prompt_batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    return CalibrationBatch(
        problems,
        prompts,
        input_ids.to(device),
        attention.to(device),
        target_mask.to(device),
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
        nll[rows] = sums / target.sum(1).clamp(min=1)
    return nll
