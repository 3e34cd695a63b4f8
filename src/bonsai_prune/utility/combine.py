"""Score generated texts against references with U† (DESIGN.md §3), without any model to prune.

``score_texts`` is the one place that combines the metrics: U† = sum_i weight_i * metric_i,
with weights summing to 100 and each metric in [0, 1], so U† lies in [0, 100]. It serves both
the pruning loop (one call per sub-model) and ``bonsai-prune score`` on a JSONL file of
predictions, so a user can check a weight mix on outputs they already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from bonsai_prune.core.metrics import (
    ACCURACY_RULES,
    LEXICAL_METRICS,
    clean_text,
    contains_accuracy,
    parse_number,
    strict_accuracy,
)
from bonsai_prune.core.weights import validate_weights
from bonsai_prune.data.problems import final_answer, json_objects
from bonsai_prune.errors import ConfigError, DataError
from bonsai_prune.utility.semantic import SemanticScorer

METRICS = ("accuracy", "lexical", "semantic")
_WEIGHT_OF = {"accuracy": "acc", "lexical": "lex", "semantic": "sem"}


@dataclass(frozen=True)
class ScoreResult:
    """Per-item and mean scores.

    ``per_item[i]`` has keys accuracy, lexical, semantic (None where the metric's weight is 0,
    since it was not computed), u_dagger in [0, 100], and accuracy_strict / accuracy_contains,
    always reported so the two accuracy rules can be compared (accuracy_strict is None when the
    reference has no numeric final answer). ``aggregate`` holds the mean of each of these keys
    over the items where it is not None (None if it never is) and n, the number of items.
    """

    per_item: list[dict[str, float | None]]
    aggregate: dict[str, float | int | None]


def score_texts(
    predictions: list[str],
    references: list[str],
    weights: dict[str, float],
    *,
    accuracy_rule: str = "strict",
    lexical: str = "rouge_numbers",
    semantic_scorer: SemanticScorer | None = None,
) -> ScoreResult:
    """Score each prediction against its reference with U†.

    Args:
        predictions: generated texts, one per item.
        references: GSM8K solutions ("... #### 18") or bare answers, aligned with predictions.
        weights: the U† mix, e.g. {"acc": 50, "lex": 25, "sem": 25}; validated here.
        accuracy_rule: a name in ACCURACY_RULES ("strict" or "contains").
        lexical: a name in LEXICAL_METRICS ("rouge_numbers" or "token_f1").
        semantic_scorer: reuse one across calls to keep its reference-embedding cache; created
            on demand when the semantic weight is above 0, never otherwise.
    """
    weights = validate_weights(weights)
    accuracy = _choose(ACCURACY_RULES, accuracy_rule, "accuracy rule")
    lexical_metric = _choose(LEXICAL_METRICS, lexical, "lexical metric")
    _check_inputs(predictions, references)
    numeric = [parse_number(final_answer(r)) is not None for r in references]
    if weights["acc"] > 0 and accuracy is strict_accuracy and not all(numeric):
        bad = numeric.index(False)
        raise DataError(
            f"reference {bad + 1} has final answer {final_answer(references[bad])!r}, not a "
            "number; strict accuracy needs numbers (use the 'contains' rule or acc=0)"
        )

    columns: dict[str, list[float | None]] = {name: [None] * len(predictions) for name in METRICS}
    if weights["acc"] > 0:
        columns["accuracy"] = [accuracy(p, r) for p, r in zip(predictions, references, strict=True)]
    if weights["lex"] > 0:
        columns["lexical"] = [
            lexical_metric(p, r) for p, r in zip(predictions, references, strict=True)
        ]
    if weights["sem"] > 0:
        scorer = semantic_scorer if semantic_scorer is not None else SemanticScorer()
        columns["semantic"] = scorer.similarity(
            [clean_text(p) for p in predictions], [clean_text(r) for r in references]
        )

    per_item = []
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        item = {name: columns[name][i] for name in METRICS}
        item["u_dagger"] = sum(
            weights[_WEIGHT_OF[name]] * value for name, value in item.items() if value is not None
        )
        item["accuracy_strict"] = strict_accuracy(prediction, reference) if numeric[i] else None
        item["accuracy_contains"] = contains_accuracy(prediction, reference)
        per_item.append(item)
    return ScoreResult(per_item=per_item, aggregate=_aggregate(per_item))


def load_score_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a JSONL file of {"prediction": str, "reference": str} lines: (predictions, references).

    Blank lines are skipped. An empty prediction is allowed (a model may generate nothing); an
    empty reference is not. Problems raise DataError naming the file and line.
    """
    from bonsai_prune.validation import read_text_lines

    path = Path(path)
    lines = read_text_lines(path, "score file", "a JSONL file of prediction/reference lines")
    predictions, references = [], []
    for number, row in json_objects(lines, str(path)):
        if not isinstance(row.get("prediction"), str):
            raise DataError(f"{path} line {number} lacks a string field 'prediction'")
        if not isinstance(row.get("reference"), str) or not row["reference"].strip():
            raise DataError(f"{path} line {number} lacks a non-empty string field 'reference'")
        predictions.append(row["prediction"])
        references.append(row["reference"])
    if not predictions:
        raise DataError(f"score file {path} is empty; give at least one prediction/reference line")
    return predictions, references


def _choose(table: dict, name: str, kind: str):
    """Look up a metric by name; an unknown name lists the valid ones."""
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def _check_inputs(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise DataError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "give one reference per prediction"
        )
    if not predictions:
        raise DataError("nothing to score: no predictions given")


def _aggregate(per_item: list[dict[str, float | None]]) -> dict[str, float | int | None]:
    """Mean of every key over the items where it was computed, plus n."""
    aggregate: dict[str, float | int | None] = {}
    for key in per_item[0]:
        values = [item[key] for item in per_item if item[key] is not None]
        aggregate[key] = fmean(values) if values else None
    aggregate["n"] = len(per_item)
    return aggregate
