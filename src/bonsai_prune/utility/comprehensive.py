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

import torch

from ..config import UtilityConfig
from ..scoring import score_texts
from ..utility.semantic import SemanticScorer
from .base import UTILITIES, CalibrationBatch


@torch.no_grad()
def generate_greedy(model, batch: CalibrationBatch, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the batch's prompts (new text only, stops at end-of-sequence)."""
    tokenizer = batch.tokenizer
    output = model.generate(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, batch.prompt_ids.shape[1] :]  # (n, <= max_new_tokens)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def reference_prefixes(batch: CalibrationBatch, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of each reference solution, as text."""
    from ..prompts import worked_solution

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
        self._prefix_cache: dict[int, tuple[list[str], list[str]]] = {}

    def references(self, batch: CalibrationBatch) -> tuple[list[str], list[str]]:
        """(full answers for accuracy, same-length prefixes for similarity), once per batch."""
        key = id(batch)
        if key not in self._prefix_cache:
            self._prefix_cache = {
                key: (
                    [p.answer for p in batch.problems],
                    reference_prefixes(batch, self.config.gen_tokens),
                )
            }
        return self._prefix_cache[key]

    def __call__(self, model, batch: CalibrationBatch) -> float:
        outputs = generate_greedy(model, batch, self.config.gen_tokens)
        answers, prefixes = self.references(batch)
        return self.score(outputs, answers, prefixes)

    def score(self, outputs: list[str], answers: list[str], prefixes: list[str]) -> float:
        """U† in [0, 100] from generated texts."""
        weights = self.config.weights
        total = 0.0
        if weights["acc"] > 0:
            acc = score_texts(
                outputs,
                answers,
                {"acc": 100.0, "lex": 0.0, "sem": 0.0},
                accuracy_rule=self.config.accuracy,
            )
            total += weights["acc"] * acc.aggregate["accuracy"]
        if weights["lex"] > 0 or weights["sem"] > 0:
            similarity = {"acc": 0.0, "lex": weights["lex"], "sem": weights["sem"]}
            sim = score_texts(
                outputs,
                prefixes,
                similarity,
                lexical=self.config.lexical,
                semantic_scorer=self.semantic,
            )
            total += sim.aggregate["u_dagger"]
        return total
