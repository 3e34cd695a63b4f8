"""Greedy generation where the token budget is a cap: each row stops on its own.

A row ends at end-of-sequence or where a stop pattern completes: after the line that states its
answer ("#### 18", "the answer is 18") when a sub-model is scored, at a made-up next
"Question:" in plain k-shot evaluation (as lm-evaluation-harness stops). A batch runs until
every row has ended or the cap is reached; rows that ended early are padded and their padding
is not part of their text. Whether a row *finished* (ended by itself) or was cut at the cap is
returned too: the strict accuracy rule reads a cut-off text's answer only after a marker.

Every greedy decode of the project goes through :func:`greedy_sequences`: the lean decoder
(``models.decoding``) where the model allows it, transformers' ``generate`` elsewhere; the
tokens are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bonsai_prune.core.metrics import QUESTION_STOP, STOP_PATTERNS
from bonsai_prune.models.decoding import greedy_decode, why_not_lean

_WINDOW = 32  # tokens decoded to look for a pattern: an answer line is far shorter


@dataclass(frozen=True)
class Generated:
    """Greedy outputs, one per prompt row."""

    texts: list[str]  # new text only, cut before a "Question:" stop
    token_ids: list[list[int]]  # the tokens generated, up to and including the row's end
    n_tokens: list[int]  # tokens generated, up to and including the one that ended the row
    finished: list[bool]  # True: ended by end-of-sequence or a stop pattern, not by the cap


class _RowStopper(StoppingCriteria):
    """Marks rows done at end-of-sequence or when ``pattern`` matches their newest tokens."""

    def __init__(self, tokenizer, prompt_width: int, pattern, eos_ids: set[int]) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.pattern, self.eos_ids = pattern, eos_ids
        self.stopped_at: dict[int, int] = {}  # row -> tokens generated when it ended

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]  # (B, t)
        done = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(new.shape[0]):
            if row not in self.stopped_at and self._ends(new[row]):
                self.stopped_at[row] = new.shape[1]
            done[row] = row in self.stopped_at
        return done

    def _ends(self, tokens: torch.Tensor) -> bool:
        if int(tokens[-1]) in self.eos_ids:
            return True
        if self.pattern is None:
            return False
        window = self.tokenizer.decode(tokens[-_WINDOW:], skip_special_tokens=True)
        return self.pattern.search(window) is not None


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


class _CallStop(StoppingCriteria):
    """A ``stop(sequences) -> (B,) bool`` function as transformers' stopping criterion."""

    def __init__(self, stop: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return self.stop(input_ids)


@torch.no_grad()
def greedy_sequences(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    pad_token_id: int,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefilled: tuple | None = None,
) -> torch.Tensor:
    """Greedy continuations (B, P + T) of left-padded prompts (B, P), rows padded after they end.

    stop(sequences) -> (B,) bool marks the rows that have ended; None: every row runs the full
    ``max_new_tokens`` (a speed measurement). The lean decoder runs where :func:`why_not_lean`
    allows (Llama-shaped families on CPU), transformers' ``generate`` otherwise. prefilled:
    the lean decoder's prompt state from a caller that ran the prompts (``greedy_decode``).
    """
    if why_not_lean(model) is None:
        return greedy_decode(
            model,
            input_ids,
            attention_mask,
            max_new_tokens,
            pad_token_id=pad_token_id,
            stop=stop,
            prefilled=prefilled,
        )
    if prefilled is not None:
        raise ValueError(f"a prefilled decoder needs the lean decoder: {why_not_lean(model)}")
    if stop is None:
        until = {"min_new_tokens": max_new_tokens}  # end-of-sequence may not end a row
    else:
        until = {"stopping_criteria": StoppingCriteriaList([_CallStop(stop)])}
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        **until,
    )


def end_of_sequence(eos_ids: set[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``stop`` for :func:`greedy_sequences`: a row ends at one of ``eos_ids``."""
    ids = torch.tensor(sorted(eos_ids))
    return lambda sequences: torch.isin(sequences[:, -1], ids.to(sequences.device))


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop: str = "answer",
    prefilled: tuple | None = None,
) -> Generated:
    """Greedy continuations (B rows) of left-padded prompts (B, P), at most ``max_new_tokens``.

    stop: "answer" (end after the answer's line), "question" (end at a new "Question:", cut
    there) or "none" (end-of-sequence only). prefilled: see :func:`greedy_sequences`.
    """
    pattern = STOP_PATTERNS[stop]
    stopper = _RowStopper(tokenizer, input_ids.shape[1], pattern, stop_token_ids(model, tokenizer))
    output = greedy_sequences(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        stop=lambda sequences: stopper(sequences, None),
        prefilled=prefilled,
    )
    new = output[:, input_ids.shape[1] :].cpu()  # (B, <= max_new_tokens)
    texts, tokens, counts, finished = [], [], [], []
    for row in range(new.shape[0]):
        n = stopper.stopped_at.get(row, new.shape[1])
        text = tokenizer.decode(new[row, :n], skip_special_tokens=True)
        if pattern is QUESTION_STOP:
            text = text.split("Question:", 1)[0]
        texts.append(text)
        tokens.append(new[row, :n].tolist())
        counts.append(n)
        finished.append(row in stopper.stopped_at)
    return Generated(texts, tokens, counts, finished)
