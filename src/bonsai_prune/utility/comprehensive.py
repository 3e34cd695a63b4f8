"""U†, the comprehensive metric, as a Bonsai utility (DESIGN.md section 3).

Each sub-model greedily writes a solution to every calibration question, at most
``gen_tokens`` tokens, each row stopping after the line that states its answer (``stop``);
U† = sum_i a_i * M_i, in [0, 100], combined by ``scoring.score_texts`` (the one combiner, which
``score`` and ``evaluate`` use too). What each metric compares with:

- ``acc``: the gold final answer (strict: stated after a marker or at the end of a finished
  solution; flexible: the last number; contains: the original study's rule);
- ``prob``: the teacher-forced probability of the gold final answer after the question and
  the gold reasoning, per answer token: continuous, so a damaged model loses it gradually;
- ``lex``, ``sem``: the reference of ``reference`` (``self``, ``gold`` or ``gold_prefix``, see
  ``references.py``).

The original study's setting is ``original_study_config()``: weights 38/38/24, the "contains"
rule, SQuAD token F1, 20 tokens against the reference's 20-token prefix, no answer stop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch

from bonsai_prune.config import UtilityConfig
from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.models.decoding import prefill_decoder, why_not_lean
from bonsai_prune.utility.base import (
    UTILITIES,
    prompt_lengths,
    sub_model_nll,
    sub_model_nll_and_prompts,
)
from bonsai_prune.utility.combine import score_texts
from bonsai_prune.utility.generation import Generated, generate_greedy
from bonsai_prune.utility.references import gold_texts, prefix_text, self_reference_texts
from bonsai_prune.utility.semantic import SemanticScorer


def original_study_config() -> UtilityConfig:
    """The original U† study's best setting, to reproduce and compare with (DESIGN.md §3)."""
    return UtilityConfig(
        name="comprehensive",
        weights={"acc": 38, "lex": 38, "sem": 24},
        accuracy="contains",
        lexical="token_f1",
        gen_tokens=20,
        reference="gold_prefix",
        stop="none",
    )


@UTILITIES.register("comprehensive")
class ComprehensiveUtility:
    """U† of a sub-model's greedy solutions against the references."""

    def __init__(self, config: UtilityConfig | None = None) -> None:
        self.config = config or UtilityConfig(name="comprehensive")
        # The embedding model is not loaded at all when the semantic weight is 0.
        self.semantic = SemanticScorer() if self.config.weights.get("sem", 0) > 0 else None
        self.self_references: dict[str, str] = {}  # problem key -> the dense parent's solution

    def use_self_references(self, references: Mapping[str, str]) -> None:
        """Install the dense parent's solutions (see ``references.prepare_self_references``)."""
        self.self_references = dict(references)

    def __call__(self, model, batch: CalibrationBatch) -> float:
        return self._scores(model, batch, 1, nullcontext, nullcontext)[0]

    def score_masks(
        self, model, batch: CalibrationBatch, masks: torch.Tensor, apply_masks: Callable
    ) -> list[float]:
        """U† of several sub-models (G, U) in one batched generation.

        Each prompt is repeated once per mask and every row runs its own sub-model: the decode
        steps are overhead-bound, so G masks cost far less than G calls.
        """
        n = len(batch.problems)
        return self._scores(
            model,
            batch,
            masks.shape[0],
            lambda: apply_masks(masks),  # (G, U): row g of a teacher-forced forward
            lambda: apply_masks(masks.repeat_interleave(n, dim=0)),  # row i uses mask i // n
        )

    def _scores(
        self,
        model,
        batch: CalibrationBatch,
        groups: int,
        per_problem: Callable[[], AbstractContextManager],
        per_row: Callable[[], AbstractContextManager],
    ) -> list[float]:
        """U† of G sub-models: ``per_problem()`` masks the teacher-forced forwards (G rows, one
        problem), ``per_row()`` the generation (G * n rows, sub-model g on rows g*n..g*n+n-1).

        With the answer probability, its forwards over prompt + reference solution also hold
        each prompt's K/V, and the lean decoder starts from them instead of running the prompts
        again (a fifth of the time, measured on the packaged model in fp32).
        """
        n = len(batch.problems)
        probs, prefilled = None, None
        if self.config.weights["prob"] > 0:
            prompts = prompt_lengths(batch) if why_not_lean(model) is None else None
            with per_problem():
                if prompts is None:  # teacher forced, one unpadded forward per problem
                    nll = sub_model_nll(model, batch, groups, batch.answer_mask)  # (G, n)
                else:
                    capacity = batch.prompt_ids.shape[1] + self.config.gen_tokens
                    decoder = prefill_decoder(model, groups * n, capacity)
                    nll, logits = sub_model_nll_and_prompts(
                        model, batch, groups, batch.answer_mask, decoder, prompts
                    )
                    prefilled = (decoder, logits)
            probs = torch.exp(-nll).flatten()  # (G*n,): row g * n + i, as generated
        with per_row():
            generated = generate_greedy(
                model,
                batch.tokenizer,
                batch.prompt_ids.repeat(groups, 1),  # (G*n, P)
                batch.prompt_attention_mask.repeat(groups, 1),
                self.config.gen_tokens,
                self.config.stop,
                prefilled=prefilled,
            )
        scores = []
        for g in range(groups):
            rows = slice(g * n, (g + 1) * n)
            part = Generated(*(field[rows] for field in _fields(generated)))
            scores.append(self.score_generated(batch, part, None if probs is None else probs[rows]))
        return scores

    def references(self, batch: CalibrationBatch, generated: Generated) -> list[str]:
        """What lexical and semantic similarity compare each generation with."""
        kind = self.config.reference
        if kind == "self":
            return self_reference_texts(self.self_references, batch.problems)
        if kind == "gold":
            return gold_texts(
                batch.tokenizer, batch.problems, generated.n_tokens, generated.finished
            )
        from bonsai_prune.data.prompts import worked_solution

        return [
            prefix_text(batch.tokenizer, worked_solution(p), self.config.gen_tokens)
            for p in batch.problems
        ]

    def score_generated(
        self, batch: CalibrationBatch, generated: Generated, probs: torch.Tensor | None
    ) -> float:
        """U† in [0, 100] of one sub-model's generations (n rows) on the batch's problems."""
        result = score_texts(
            generated.texts,
            self.references(batch, generated),
            self.config.weights,
            answers=[p.answer for p in batch.problems],
            finished=generated.finished,
            answer_probs=None if probs is None else probs.tolist(),
            accuracy_rule=self.config.accuracy,
            lexical=self.config.lexical,
            semantic_scorer=self.semantic,
        )
        return float(result.aggregate["u_dagger"])


def _fields(generated: Generated) -> tuple[list, ...]:
    return (generated.texts, generated.token_ids, generated.n_tokens, generated.finished)
