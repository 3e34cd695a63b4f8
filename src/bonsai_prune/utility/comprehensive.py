"""U†, the comprehensive metric, as a Bonsai utility (DESIGN.md section 3).

Each sub-model greedily writes ``gen_tokens`` new tokens for every calibration question;
U† = sum_i a_i * M_i over accuracy, lexical and semantic similarity, in [0, 100].

What the short generation is compared with: accuracy looks for the reference *final answer*
(a sub-model that answers within the budget deserves it); lexical and semantic similarity
compare with the reference solution's *prefix of the same number of tokens*. Twenty tokens
cannot reproduce a whole worked solution, so against the full reference every sub-model
scores low and alike (length dominates); against the prefix the score says whether the model
starts down the reference's line of reasoning, which is what separates good sub-models from
broken ones. The prefixes are fixed per round, so their embeddings are computed once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bonsai_prune.config import UtilityConfig
from bonsai_prune.core.metrics import ACCURACY_RULES, LEXICAL_METRICS
from bonsai_prune.data.calibration import CalibrationBatch
from bonsai_prune.utility.base import UTILITIES
from bonsai_prune.utility.semantic import SemanticScorer


@torch.no_grad()
def generate_greedy(
    model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
) -> list[str]:
    """Greedy continuations of left-padded prompts (new text only, stops at end-of-sequence)."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, input_ids.shape[1] :]  # (n, <= max_new_tokens)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def reference_prefixes(batch: CalibrationBatch, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of each reference solution, as text."""
    from bonsai_prune.data.prompts import worked_solution

    tokenizer = batch.tokenizer
    prefixes = []
    for problem in batch.problems:
        ids = tokenizer(worked_solution(problem), add_special_tokens=False)["input_ids"]
        prefixes.append(tokenizer.decode(ids[:n_tokens], skip_special_tokens=True))
    return prefixes


@UTILITIES.register("comprehensive")
class ComprehensiveUtility:
    """U† of a sub-model's short greedy solutions against the references."""

    def __init__(self, config: UtilityConfig | None = None) -> None:
        self.config = config or UtilityConfig(name="comprehensive")
        # The embedding model is not loaded at all when the semantic weight is 0.
        self.semantic = SemanticScorer() if self.config.weights.get("sem", 0) > 0 else None
        # The batch itself is held, not its id(): a freed batch's id can be reused by the next
        # round's batch, which would then be scored against the previous round's references.
        self._cached: tuple[CalibrationBatch, tuple[list[str], list[str]]] | None = None

    def references(self, batch: CalibrationBatch) -> tuple[list[str], list[str]]:
        """(full answers for accuracy, same-length prefixes for similarity), once per batch."""
        if self._cached is None or self._cached[0] is not batch:
            answers = [p.answer for p in batch.problems]
            self._cached = (batch, (answers, reference_prefixes(batch, self.config.gen_tokens)))
        return self._cached[1]

    def __call__(self, model, batch: CalibrationBatch) -> float:
        outputs = generate_greedy(
            model,
            batch.tokenizer,
            batch.prompt_ids,
            batch.prompt_attention_mask,
            self.config.gen_tokens,
        )
        answers, prefixes = self.references(batch)
        return self.score(outputs, answers, prefixes)

    def score_masks(
        self, model, batch: CalibrationBatch, masks: torch.Tensor, apply_masks: Callable
    ) -> list[float]:
        """U† of several sub-models (G, U) in one batched generation.

        Each prompt is repeated once per mask and every row runs its own sub-model: at 20 new
        tokens the decode steps are overhead-bound, so G masks cost far less than G calls.
        """
        n, groups = len(batch.problems), masks.shape[0]
        ids = batch.prompt_ids.repeat(groups, 1)  # (G*n, P)
        attention = batch.prompt_attention_mask.repeat(groups, 1)
        with apply_masks(masks.repeat_interleave(n, dim=0)):  # (G*n, U): row i uses mask i // n
            outputs = generate_greedy(
                model, batch.tokenizer, ids, attention, self.config.gen_tokens
            )
        answers, prefixes = self.references(batch)
        return [self.score(outputs[g * n : (g + 1) * n], answers, prefixes) for g in range(groups)]

    def score(self, outputs: list[str], answers: list[str], prefixes: list[str]) -> float:
        """U† in [0, 100]: accuracy against the final answers, similarity against the prefixes."""
        weights, n = self.config.weights, len(outputs)
        total = 0.0
        if weights["acc"] > 0:
            rule = ACCURACY_RULES[self.config.accuracy]
            total += weights["acc"] * sum(map(rule, outputs, answers)) / n
        if weights["lex"] > 0:
            lexical = LEXICAL_METRICS[self.config.lexical]
            total += weights["lex"] * sum(map(lexical, outputs, prefixes)) / n
        if weights["sem"] > 0:
            total += weights["sem"] * sum(self.semantic.similarity(outputs, prefixes)) / n
        return total
