"""The pure U† text metrics on hand-written strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonsai_prune.core.metrics import (
    ACCURACY_RULES,
    LEXICAL_METRICS,
    LM_EVAL_RULES,
    clean_text,
    contains_accuracy,
    extract_flexible,
    extract_strict,
    find_numbers,
    flexible_accuracy,
    lexical_similarity,
    number_overlap_f1,
    parse_number,
    rouge_l_f1,
    strict_accuracy,
    token_f1,
)
from bonsai_prune.errors import DataError

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,000.00", 1000.0),
        ("18.0", 18.0),
        ("18", 18.0),
        ("-3", -3.0),
        ("1,234", 1234.0),
        ("1,234,567", 1234567.0),
        ("50%", 50.0),
        ("18.", 18.0),
        ("  42  ", 42.0),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("+7", 7.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("\u22122", -2.0),  # unicode minus
        ("50%.", 50.0),
    ],
)
def test_parse_number_reads_gsm8k_spellings(text: str, expected: float) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "18 apples", "1,2", "12,34", "1.2.3", "$", "-", "nan", "inf", "1e5"]
)
def test_parse_number_rejects_non_numbers(text: str) -> None:
    assert parse_number(text) is None


def test_find_numbers_keeps_minus_as_operator_between_operands() -> None:
    assert find_numbers("5-3=2, then -4 and (3)-1") == ["5", "3", "2", "-4", "3", "1"]


def test_find_numbers_reads_separators_and_currency() -> None:
    assert find_numbers("costs $1,000.50 for 1,2345 items") == ["1,000.50", "1", "2345"]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("48/2 = 24 and 48+24 = 72\n#### 72", "72"),
        ("#### 5 then #### 7", "5"),  # the first marker wins, as lm-eval's strict-match
        ("#### 18\n\nQuestion: Tom has 3 apples", "18"),  # first number after the marker
        ("so 3+4=7. The answer is 9. Next 11", "9"),
        ("THE ANSWER IS $1,200.", "1,200"),
        ("The final answer is 12", "12"),
        ("Answer: -4 and 7", "-4"),
        ("answer: 3. Later the answer is 8", "3"),  # what it went on to write does not count
        # '####' outranks a phrase written on the way (a pruned model's output, lm-eval agrees)
        ("The answer is 15 / 2 = 7.\nThe total.\n#### 25\n\n", "25"),
        ("The answer is:\n5 apples, so 7", "7"),  # no number on the marker's line: last number
        ("she has 3 then 4 then 5 apples", "5"),  # a finished solution: its last number
        ("24 clips ####", "24"),  # marker without a number falls through
        ("The answer is unknown, maybe 6", "6"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_strict_of_a_finished_solution(output: str, expected: str | None) -> None:
    assert extract_strict(output, finished=True) == expected


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("so far 3 + 4 = 7 and then", None),  # cut at the cap: the last number is a step
        ("24 clips ####", None),
        ("she had 5. #### 72\nmore 9", "72"),
        ("the answer is 8, and 3 + 4 = 7", "8"),
    ],
)
def test_extract_strict_of_a_cut_off_solution_needs_a_marker(output, expected) -> None:
    assert extract_strict(output, finished=False) == expected


def test_extract_flexible_takes_the_last_number() -> None:
    assert extract_flexible("#### 5 then 7 and 9.") == "9"
    assert extract_flexible("none") is None


def test_strict_and_flexible_differ_on_cut_off_text() -> None:
    assert strict_accuracy("3 + 4 = 72", "72", finished=False) == 0.0
    assert strict_accuracy("3 + 4 = 72", "72", finished=True) == 1.0
    assert flexible_accuracy("3 + 4 = 72", "72") == 1.0


@pytest.mark.parametrize(
    ("output", "reference", "expected"),
    [
        ("... #### 72", GSM8K_ANSWER, 1.0),
        ("The answer is 72.0", "72", 1.0),
        ("It costs $1,000.", "1000", 1.0),
        ("It costs 1000", "#### 1,000", 1.0),
        ("72.0000001", "72", 1.0),  # within the 1e-6 relative tolerance
        ("72.01", "72", 0.0),
        ("The answer is 71", GSM8K_ANSWER, 0.0),
        ("-3", "-3", 1.0),
        ("3", "-3", 0.0),
        ("0", "0", 1.0),
        ("", "72", 0.0),
        ("no number at all", "72", 0.0),
    ],
)
def test_strict_accuracy(output: str, reference: str, expected: float) -> None:
    assert strict_accuracy(output, reference) == expected


def test_strict_accuracy_refuses_a_non_numeric_reference() -> None:
    with pytest.raises(DataError, match="not a number"):
        strict_accuracy("18", "#### eighteen")


@pytest.mark.parametrize(
    ("output", "reference", "expected"),
    [
        ("so she has 72 clips", GSM8K_ANSWER, 1.0),
        ("it costs $1000", "1,000", 1.0),  # commas removed on both sides
        ("it costs $1,000", "1000", 1.0),
        ("she has 71", "72", 0.0),
        ("", "72", 0.0),
    ],
)
def test_contains_accuracy(output: str, reference: str, expected: float) -> None:
    assert contains_accuracy(output, reference) == expected


@pytest.mark.parametrize(
    "output",
    [
        "She earned 180 dollars. #### 180",  # "18" inside "180"
        "He had 18 apples and bought 5, so 18+5=23. #### 23",  # 18 is only an intermediate
    ],
)
def test_contains_gives_false_positives_that_strict_rejects(output: str) -> None:
    reference = "3 * 6 = <<3*6=18>>18\n#### 18"
    assert contains_accuracy(output, reference) == 1.0
    assert strict_accuracy(output, reference) == 0.0


def test_clean_text_drops_annotations_and_marker_but_keeps_numbers() -> None:
    assert clean_text("sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "sold 48/2 = 24 clips. 72"


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("The Cat, sat!", "the cat sat", 1.0),  # lowercased, punctuation dropped
        ("a b c d", "a c", 2 * (2 / 4) * 1.0 / (2 / 4 + 1.0)),  # LCS 2: P=1/2, R=1
        ("c b a", "a b c", 1 / 3),  # LCS 1 of 3 tokens either side
        ("1,000 dollars", "1000 dollars", 1.0),  # numbers compared by value
        ("18.0 apples", "18 apples", 1.0),
        ("x y", "p q", 0.0),
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("!!!", "the cat", 0.0),
    ],
)
def test_rouge_l_f1(candidate: str, reference: str, expected: float) -> None:
    assert rouge_l_f1(candidate, reference) == pytest.approx(expected)


def test_rouge_l_f1_is_symmetric_and_bounded() -> None:
    a, b = "she sold 48 clips in april and 24 in may", "in may she sold half as many clips"
    assert rouge_l_f1(a, b) == pytest.approx(rouge_l_f1(b, a))
    assert 0.0 < rouge_l_f1(a, b) < 1.0


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("24 and 72", "48/2 = 24, 48+24 = 72", 0.5),  # P=2/2, R=2/6 (48, 2, 24, 48, 24, 72)
        ("1,000 then $5", "1000 and 5", 1.0),  # parsed values
        ("18.0", "18", 1.0),
        ("24 24", "24", 2 * 0.5 * 1.0 / 1.5),  # multisets: the second 24 is unmatched
        ("7", "8", 0.0),
        ("no numbers", "8 apples", 0.0),
        ("no numbers", "no numbers either", 1.0),  # reference has none, candidate invents none
        ("3 apples", "no numbers", 0.0),  # reference has none, candidate invents some
    ],
)
def test_number_overlap_f1(candidate: str, reference: str, expected: float) -> None:
    assert number_overlap_f1(candidate, reference) == pytest.approx(expected)


def test_lexical_similarity_matches_its_definition() -> None:
    candidate = "Natalia sold 24 clips in May, so 72 in all. #### 72"
    c, r = clean_text(candidate), clean_text(GSM8K_ANSWER)
    expected = 0.5 * rouge_l_f1(c, r) + 0.5 * number_overlap_f1(c, r)
    assert lexical_similarity(candidate, GSM8K_ANSWER) == pytest.approx(expected)
    assert 0.0 < expected < 1.0


def test_lexical_similarity_ignores_calculator_annotations() -> None:
    clean_reference = clean_text(GSM8K_ANSWER)
    assert "<<" not in clean_reference
    assert lexical_similarity(clean_reference, GSM8K_ANSWER) == pytest.approx(1.0)


def test_lexical_similarity_of_an_empty_candidate_is_zero() -> None:
    assert lexical_similarity("", "a reference without numbers") == 0.0
    assert lexical_similarity("   ", GSM8K_ANSWER) == 0.0


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [
        ("The cat sat.", "the cat sat", 1.0),
        ("a cat sat", "the cat sat", 1.0),  # articles dropped
        ("cat sat on mat", "the cat sat", 2 * 0.5 * 1.0 / 1.5),  # P=2/4, R=2/2
        ("sat cat", "cat sat", 1.0),  # a bag: order does not matter
        ("1,000", "1000", 1.0),  # punctuation removed
        ("dog", "cat", 0.0),
        ("", "cat", 0.0),
        ("the", "the", 0.0),  # nothing left after removing articles
    ],
)
def test_token_f1(candidate: str, reference: str, expected: float) -> None:
    assert token_f1(candidate, reference) == pytest.approx(expected)


def test_token_f1_sees_text_without_annotations() -> None:
    assert token_f1(clean_text(GSM8K_ANSWER), GSM8K_ANSWER) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [*LEXICAL_METRICS.values(), *ACCURACY_RULES.values()])
@pytest.mark.parametrize(
    "candidate",
    ["", "72", "Natalia sold 24 clips. #### 72", "#### 180", "words only", GSM8K_ANSWER],
)
def test_every_registered_metric_returns_a_float_in_unit_interval(metric, candidate: str) -> None:
    value = metric(candidate, GSM8K_ANSWER)
    assert isinstance(value, float)
    assert 0.0 <= value <= 1.0


def test_registries_name_the_variants() -> None:
    assert LEXICAL_METRICS == {"rouge_numbers": lexical_similarity, "token_f1": token_f1}
    assert ACCURACY_RULES == {
        "strict": strict_accuracy,
        "flexible": flexible_accuracy,
        "contains": contains_accuracy,
    }


LM_EVAL_CASES = [
    "so #### 1800",
    "#### 1,800.",
    "#### $1800",
    "#### 1800.00",
    "The answer is 1800",
    "x 1800 y",
    "1800.",
    "#### 18 then #### 1800",
    "#### -5 and 1800",
    "",
    "no number at all",
    "$1,800 is the cost",
]


@pytest.mark.parametrize("reference", ["Some steps.\n#### 1,800", "1800", "#### -5"])
def test_lm_eval_rules_are_lm_evals_own_filters_and_metric(reference):
    """Our copies of lm-eval's gsm8k strict-match and flexible-extract give what lm-eval's own
    RegexFilter + exact_match give on the stock task's settings, text by text."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install .[lmeval])")
    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    stock = yaml.safe_load(
        (Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text()
    )
    metric = {
        k: v
        for k, v in stock["metric_list"][0].items()
        if k not in ("metric", "aggregation", "higher_is_better")
    }
    for name in LM_EVAL_RULES:
        steps = next(f for f in stock["filter_list"] if f["name"] == name.replace("_", "-"))
        regex = steps["filter"][0]
        extract = RegexFilter(
            regex_pattern=regex["regex_pattern"], group_select=regex.get("group_select", 0)
        )
        for text in LM_EVAL_CASES:
            extracted = list(extract.apply([[text]], [{}]))[0][0]
            theirs = exact_match_hf_evaluate([extracted], [reference], **metric)["exact_match"]
            assert LM_EVAL_RULES[name](text, reference) == float(theirs), (name, text)
