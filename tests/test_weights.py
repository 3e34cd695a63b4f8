"""Parsing and validating the U† weights."""

from __future__ import annotations

import pytest

from bonsai_prune.core.weights import (
    DEFAULT_WEIGHTS,
    format_weights,
    parse_weights,
    validate_weights,
)
from bonsai_prune.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("acc=50,lex=25,sem=25", {"acc": 50.0, "lex": 25.0, "sem": 25.0, "prob": 0.0}),
        (" acc = 38 , lex=38, sem=24 ", {"acc": 38.0, "lex": 38.0, "sem": 24.0, "prob": 0.0}),
        (
            "accuracy=60,lexical=20,semantic=20",
            {"acc": 60.0, "lex": 20.0, "sem": 20.0, "prob": 0.0},
        ),
        ("ACC=100", {"acc": 100.0, "lex": 0.0, "sem": 0.0, "prob": 0.0}),  # missing names weigh 0
        ("sem=100", {"acc": 0.0, "lex": 0.0, "sem": 100.0, "prob": 0.0}),
        (
            "acc=34,lex=33,sem=33,",
            {"acc": 34.0, "lex": 33.0, "sem": 33.0, "prob": 0.0},
        ),  # trailing comma
        ("acc=33.3,lex=33.3,sem=33.4", {"acc": 33.3, "lex": 33.3, "sem": 33.4, "prob": 0.0}),
    ],
)
def test_parse_weights(spec: str, expected: dict[str, float]) -> None:
    weights = parse_weights(spec)
    assert weights == pytest.approx(expected)
    assert list(weights) == ["acc", "lex", "sem", "prob"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acc=50,lex=25", r"must sum to 100, got acc=50, lex=25 \(75\); e\.g\. --weights"),
        ("acc=60,lex=30,sem=30", r"must sum to 100.*\(120\)"),
        ("acc50,lex=50", r"'acc50' is not name=value"),
        ("acc=x,lex=100", r"acc='x' is not a number"),
        ("acc=,lex=100", r"'acc=' is not name=value"),
        ("=50,lex=50", r"'=50' is not name=value"),
        ("acc=-10,lex=60,sem=50", r"acc=-10.0 must be a finite number >= 0"),
        ("acc=nan,lex=100", r"finite"),
        ("acc=50,ppl=50", r"unknown U† weight 'ppl'; use acc, lex, sem"),
        ("acc=50,acc=50", r"'acc' is given twice"),
        ("acc=50,accuracy=50", r"'acc' is given twice"),
        ("", r"no U† weights given"),
        (" , ", r"no U† weights given"),
        ("acc=0,lex=0,sem=0", r"must sum to 100"),
    ],
)
def test_parse_weights_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_weights(spec)


def test_error_messages_are_one_line() -> None:
    for spec in ("acc=50,lex=25", "acc50", "acc=50,ppl=50", "acc=-1,lex=101"):
        with pytest.raises(ConfigError) as info:
            parse_weights(spec)
        assert "\n" not in str(info.value)


def test_validate_weights_fills_missing_names_and_maps_long_names() -> None:
    assert validate_weights({"accuracy": 70, "probability": 30}) == {
        "acc": 70.0,
        "lex": 0.0,
        "sem": 0.0,
        "prob": 30.0,
    }


def test_validate_weights_accepts_rounding_within_tolerance() -> None:
    weights = validate_weights({"acc": 100 / 3, "lex": 100 / 3, "sem": 100 / 3})
    assert sum(weights.values()) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"acc": 50.0, "lex": 50.0001}, "must sum to 100"),
        ({"acc": -5.0, "lex": 105.0}, ">= 0"),
        ({"acc": float("inf")}, "finite"),
        ({"acc": "50", "lex": 50}, "not a number"),
        ({"acc": True, "lex": 99}, "not a number"),
        ({"perplexity": 100.0}, "unknown U† weight 'perplexity'"),
    ],
)
def test_validate_weights_rejects(weights: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_weights(weights)


def test_default_weights_are_valid() -> None:
    assert validate_weights(DEFAULT_WEIGHTS) == DEFAULT_WEIGHTS
    assert DEFAULT_WEIGHTS == {"acc": 50.0, "lex": 25.0, "sem": 25.0, "prob": 0.0}


@pytest.mark.parametrize(
    "weights",
    [
        DEFAULT_WEIGHTS,
        {"acc": 38.0, "lex": 38.0, "sem": 24.0, "prob": 0.0},
        {"acc": 33.5, "lex": 33.0, "sem": 33.5, "prob": 0.0},
    ],
)
def test_format_weights_round_trips(weights: dict[str, float]) -> None:
    assert parse_weights(format_weights(weights)) == weights


def test_format_weights_prints_whole_numbers_plainly() -> None:
    assert format_weights(DEFAULT_WEIGHTS) == "acc=50,lex=25,sem=25"
    assert format_weights({"acc": 33.5, "lex": 66.5}) == "acc=33.5,lex=66.5"
