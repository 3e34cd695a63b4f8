"""U† (DESIGN.md §3): the one place that combines the metrics into a score.

U† = sum_i weight_i * metric_i, with weights summing to 100 and each metric in [0, 1], so U†
lies in [0, 100]. The pruning utility (one call per sub-model), ``bonsai-prune score`` on a JSONL
file of predictions and ``evaluate`` all call ``score_texts``, so a weight mix means the same
number everywhere (they used to disagree: only this path cleaned texts before the semantic
metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from bonsai_prune.core.metrics import (
    ACCURACY_RULES,
    LEXICAL_METRICS,
    LM_EVAL_RULES,
    clean_text,
    contains_accuracy,
    flexible_accuracy,
    parse_number,
    strict_accuracy,
)
from bonsai_prune.core.weights import validate_weights
from bonsai_prune.data.problems import final_answer, json_objects
from bonsai_prune.errors import ConfigError, DataError
from bonsai_prune.utility.semantic import SemanticScorer

METRICS = ("accuracy", "lexical", "semantic", "answer_prob")
_WEIGHT_OF = {"accuracy": "acc", "lexical": "lex", "semantic": "sem", "answer_prob": "prob"}


@dataclass(frozen=True)
class ScoreResult:
    """Per-item and mean scores.

    ``per_item[i]`` has keys accuracy, lexical, semantic, answer_prob (None where the metric's
    weight is 0, since it was not computed), u_dagger in [0, 100], and accuracy_strict /
    accuracy_flexible / accuracy_contains, always reported so the rules can be compared (the
    first two are None when the reference has no numeric final answer). ``aggregate`` holds the
    mean of each of these keys over the items where it is not None (None if it never is) and
    n, the number of items.
    """

    per_item: list[dict[str, float | None]]
    aggregate: dict[str, float | int | None]


def score_texts(
    predictions: list[str],
    references: list[str],
    weights: dict[str, float],
    *,
    answers: Sequence[str] | None = None,
    finished: Sequence[bool] | None = None,
    answer_probs: Sequence[float] | None = None,
    accuracy_rule: str = "strict",
    lexical: str = "rouge_numbers",
    semantic_scorer: SemanticScorer | None = None,
) -> ScoreResult:
    """Score each prediction with U†.

    Args:
        predictions: generated texts, one per item.
        references: what lexical and semantic similarity compare with (a GSM8K solution, its
            prefix, or the dense parent's own solution), aligned with predictions.
        weights: the U† mix, e.g. {"acc": 50, "lex": 25, "sem": 25}; validated here.
        answers: what accuracy checks: GSM8K solutions ("... #### 18") or bare answers;
            default: ``references``.
        finished: whether each generation ended by itself rather than at the token cap (the
            strict rule reads a cut-off text's answer only after a marker); default: all True.
        answer_probs: per item, the probability of the gold final answer in [0, 1] (computed
            with the model, see ``utility.base.answer_probability``); needed when prob > 0,
            reported per item whenever given.
        accuracy_rule: a name in ACCURACY_RULES ("strict", "flexible" or "contains").
        lexical: a name in LEXICAL_METRICS ("rouge_numbers" or "token_f1").
        semantic_scorer: reuse one across calls to keep its reference-embedding cache; created
            on demand when the semantic weight is above 0, never otherwise.
    """
    weights = validate_weights(weights)
    accuracy = _choose(ACCURACY_RULES, accuracy_rule, "accuracy rule")
    lexical_metric = _choose(LEXICAL_METRICS, lexical, "lexical metric")
    answers = list(references if answers is None else answers)
    finished = [True] * len(predictions) if finished is None else list(finished)
    _check_inputs(predictions, references, answers, finished)
    numeric = [parse_number(final_answer(a)) is not None for a in answers]
    if weights["acc"] > 0 and accuracy is not contains_accuracy and not all(numeric):
        bad = numeric.index(False)
        raise DataError(
            f"reference {bad + 1} has final answer {final_answer(answers[bad])!r}, not a "
            "number; strict accuracy needs numbers (use the 'contains' rule or acc=0)"
        )
    if answer_probs is not None and len(answer_probs) != len(predictions):
        raise ConfigError(
            f"{len(answer_probs)} answer probabilities for {len(predictions)} items; "
            "give one per item"
        )
    if weights["prob"] > 0 and answer_probs is None:
        raise ConfigError(
            "the U† weight prob needs the answer probability of every item, which only a model "
            "gives; set prob=0 to score texts alone"
        )

    columns: dict[str, list[float | None]] = {name: [None] * len(predictions) for name in METRICS}
    items = list(zip(predictions, references, answers, finished, strict=True))
    if weights["acc"] > 0:
        columns["accuracy"] = [accuracy(p, a, f) for p, _, a, f in items]
    if weights["lex"] > 0:
        columns["lexical"] = [lexical_metric(p, r) for p, r, _, _ in items]
    if weights["sem"] > 0:
        scorer = semantic_scorer if semantic_scorer is not None else SemanticScorer()
        columns["semantic"] = scorer.similarity(
            [clean_text(p) for p in predictions], [clean_text(r) for r in references]
        )
    if answer_probs is not None:
        # reported whether or not U† weighs it (a continuous figure where accuracy is a few %);
        # NaN: the answer did not fit the teacher-forced length, the item has no such term
        columns["answer_prob"] = [float(v) if math.isfinite(v) else None for v in answer_probs]

    per_item = []
    for i, (prediction, _, answer, done) in enumerate(items):
        item = {name: columns[name][i] for name in METRICS}
        item["u_dagger"] = sum(
            weights[_WEIGHT_OF[name]] * value for name, value in item.items() if value is not None
        )
        item["accuracy_strict"] = strict_accuracy(prediction, answer, done) if numeric[i] else None
        item["accuracy_flexible"] = flexible_accuracy(prediction, answer) if numeric[i] else None
        item["accuracy_contains"] = contains_accuracy(prediction, answer)
        for name, rule in LM_EVAL_RULES.items():  # lm-evaluation-harness's, beside ours
            item[f"accuracy_{name}"] = rule(prediction, answer)
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


def _check_inputs(
    predictions: list[str], references: list[str], answers: list[str], finished: list[bool]
) -> None:
    for name, values in (("references", references), ("answers", answers), ("flags", finished)):
        if len(values) != len(predictions):
            raise DataError(
                f"got {len(predictions)} predictions but {len(values)} {name}; "
                "give one per prediction"
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
