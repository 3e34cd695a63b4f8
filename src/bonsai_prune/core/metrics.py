"""Pure text metrics of the comprehensive utility U† (DESIGN.md §3).

Every metric compares the text a sub-model generated for a GSM8K question with the reference
solution and returns a float in [0, 1]. Nothing here touches a model, a file or global state,
so the metrics can be tested on hand-written strings and reused by ``scoring.py``.

Numbers are read the way GSM8K writes them: ``$1,000.00``, ``50%``, ``-3``, ``18.`` at the end of
a sentence. Thousands separators must be well formed (``1,234``), so a list such as ``1,2`` reads
as two numbers rather than as 12.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable

from bonsai_prune.data.problems import final_answer, strip_annotations
from bonsai_prune.errors import DataError

# A number as it appears in running text. A leading '-' counts as a sign only when it does not
# follow a word or ')' -- in "5-3=2" it is a minus, and the numbers are 5, 3 and 2.
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?",
)
# A whole string that is one number, once sign, currency, percent and trailing period are gone.
_NUMBER_BODY = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+")
# Phrases after which a model states its answer (lm-evaluation-harness's "####", widened to
# the phrases chat models use).
_ANSWER_MARKER = re.compile(r"####|the\s+(?:final\s+)?answer\s+is|answer\s*:", re.IGNORECASE)
# ROUGE tokens: a number (thousands separators allowed) or a run of letters.
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

RELATIVE_TOLERANCE = 1e-6


def parse_number(text: str) -> float | None:
    """Read ``text`` as one number, or return None.

    Accepts a sign, a currency '$', thousands separators, a trailing '%' and a trailing period,
    because GSM8K answers and model outputs write numbers that way: "$1,000.00" -> 1000.0,
    "50%" -> 50.0, "18." -> 18.0. Anything else (words, "1,2", "") gives None.
    """
    body = text.strip().replace("\u2212", "-")
    if body.endswith("."):
        body = body[:-1].rstrip()
    if body.endswith("%"):
        body = body[:-1].rstrip()
    sign = 1.0
    if body and body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:].lstrip()
    if body.startswith("$"):
        body = body[1:].lstrip()
    if body[:1] == "-" and sign == 1.0:  # "$-5"
        sign, body = -1.0, body[1:]
    if not _NUMBER_BODY.fullmatch(body):
        return None
    return sign * float(body.replace(",", ""))


def find_numbers(text: str) -> list[str]:
    """All numbers in ``text``, in order, as written but without a '$' (e.g. ["1,000", "-3"])."""
    return [match.group().replace("$", "") for match in _NUMBER_IN_TEXT.finditer(text)]


def extract_strict(output: str, finished: bool = True) -> str | None:
    """The answer ``output`` states, as a number string, or None (lm-evaluation-harness strict-match).

    1. the number right after the first '####' on its own line, as lm-evaluation-harness's
       strict-match reads it: '####' is the format GSM8K and the k-shot exemplars ask for, so it
       outranks a phrase the model wrote on the way ("The answer is 15 / 2 = 7. ... #### 25");
    2. else the number after the first phrase marker ("the answer is", "answer:") on its line,
       the way chat models state an answer (a marker without a number on its line is skipped);
    3. else, only if the solution is ``finished`` (it ended by itself, not at the token cap),
       its last number: a finished solution's last number is its conclusion, a cut-off one's is
       whatever step it had reached.
    The *first* marker of a kind decides, because a model that goes on after stating its answer
    (a made-up next question, a second attempt) must not be credited for what it wrote afterwards.
    """
    markers = list(_ANSWER_MARKER.finditer(output))
    hashes = [marker for marker in markers if marker.group() == "####"]
    for marker in hashes + [marker for marker in markers if marker.group() != "####"]:
        line = output[marker.end() :].split("\n", 1)[0]
        numbers = find_numbers(line)
        if numbers:
            return numbers[0]
    if finished:
        return extract_flexible(output)
    return None


def extract_flexible(output: str) -> str | None:
    """The last number anywhere in ``output`` (lm-evaluation-harness flexible-extract), or None."""
    numbers = find_numbers(output)
    return numbers[-1] if numbers else None


def _expected_answer(reference: str) -> float:
    expected = parse_number(final_answer(reference))
    if expected is None:
        raise DataError(
            f"reference final answer {final_answer(reference)!r} is not a number; "
            "strict accuracy needs a numeric reference (use the 'contains' rule instead)"
        )
    return expected


def _matches(answer: str | None, expected: float) -> float:
    value = parse_number(answer) if answer is not None else None
    if value is None:
        return 0.0
    return float(math.isclose(value, expected, rel_tol=RELATIVE_TOLERANCE))


def strict_accuracy(output: str, reference: str, finished: bool = True) -> float:
    """1.0 iff the answer ``output`` states (see ``extract_strict``) equals the reference's.

    ``reference`` is a full GSM8K solution ending in '#### <answer>' or a bare answer. Values are
    compared with a relative tolerance of 1e-6, so "18.0" matches "18" and "1,000" matches 1000.
    ``finished``: whether the generation ended by itself; a cut-off one counts only after a
    marker. Raises DataError when the reference final answer is not a number.
    """
    return _matches(extract_strict(output, finished), _expected_answer(reference))


def flexible_accuracy(output: str, reference: str, finished: bool = True) -> float:
    """1.0 iff the last number of ``output`` equals the reference final answer (finished unused)."""
    return _matches(extract_flexible(output), _expected_answer(reference))


def contains_accuracy(output: str, reference: str, finished: bool = True) -> float:
    """1.0 iff the reference final answer appears anywhere in ``output`` (the original rule).

    Commas are removed from both sides first. The rule gives false positives: reference "18" is
    "found" in "180" and in a wrong solution that passes through 18; ``strict_accuracy`` does not.
    """
    expected = final_answer(reference).replace(",", "")
    if not expected or not output:
        return 0.0
    return float(expected in output.replace(",", ""))


# lm-evaluation-harness gsm8k, exactly (tasks/gsm8k/gsm8k.yaml): the two filters' patterns, and
# what exact_match ignores on both sides (ignore_case too). "[invalid]" is its no-match value.
_LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_LM_EVAL_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def _lm_eval_match(extracted: str, reference: str) -> float:
    """lm-eval's exact_match: both sides stripped of ``_LM_EVAL_IGNORE``, compared lower-case."""
    for pattern in _LM_EVAL_IGNORE:
        extracted, reference = re.sub(pattern, "", extracted), re.sub(pattern, "", reference)
    return float(extracted.lower() == reference.lower())


def lm_eval_strict_match(output: str, reference: str, finished: bool = True) -> float:
    """lm-evaluation-harness's gsm8k strict-match, exactly: the first '#### n', compared as text
    with the reference's answer ("18.00" is not "18", unlike :func:`strict_accuracy`)."""
    match = _LM_EVAL_STRICT.findall(output)
    return _lm_eval_match(match[0].strip() if match else "[invalid]", reference)


def lm_eval_flexible_extract(output: str, reference: str, finished: bool = True) -> float:
    """lm-evaluation-harness's gsm8k flexible-extract, exactly: the last number-like run."""
    matches = _LM_EVAL_FLEXIBLE.findall(output)
    found = [group for group in matches[-1] if group] if matches else []
    return _lm_eval_match(found[0].strip() if found else "[invalid]", reference)


def clean_text(text: str) -> str:
    """Drop GSM8K calculator annotations and the '####' marker (its number stays), squash spaces.

    Applied to both sides before the lexical and semantic metrics, so that neither the
    ``<<48/2=24>>`` annotations nor the marker itself count as content.
    """
    return " ".join(strip_annotations(text).replace("####", " ").split())


def _canonical_number(token: str) -> str:
    """One spelling per value, so "1,000", "1000" and "1000.0" are the same ROUGE token."""
    value = float(token.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def _rouge_tokens(text: str) -> list[str]:
    tokens = _TOKEN.findall(text.lower())
    return [_canonical_number(t) if t[0].isdigit() else t for t in tokens]


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            if token_a == token_b:
                current.append(previous[j] + 1)
            else:
                current.append(max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f1(n_common: int, n_candidate: int, n_reference: int) -> float:
    if n_common == 0:
        return 0.0
    precision = n_common / n_candidate
    recall = n_common / n_reference
    return 2 * precision * recall / (precision + recall)


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word and number tokens (LCS-based); 0 if either is empty.

    Tokens are runs of letters or numbers (punctuation dropped); numbers are compared by value,
    so "1,000" and "1000" are the same token.
    """
    candidate_tokens = _rouge_tokens(candidate)
    reference_tokens = _rouge_tokens(reference)
    if not candidate_tokens or not reference_tokens:
        return 0.0
    common = _lcs_length(candidate_tokens, reference_tokens)
    return _f1(common, len(candidate_tokens), len(reference_tokens))


def number_overlap_f1(candidate: str, reference: str) -> float:
    """F1 between the multisets of number values in the two texts.

    This credits correct intermediate results, not just the final answer. Values are compared
    after parsing, so "1,000" equals "1000" and "$5" equals "5". When the reference holds no
    number there is nothing to recall: the score is 1.0 if the candidate holds none either and
    0.0 if it invents some. A reference with numbers against a candidate without gives 0.0.
    """
    candidate_values = Counter(parse_number(n) for n in find_numbers(candidate))
    reference_values = Counter(parse_number(n) for n in find_numbers(reference))
    if not reference_values:
        return 0.0 if candidate_values else 1.0
    common = sum((candidate_values & reference_values).values())
    return _f1(common, sum(candidate_values.values()), sum(reference_values.values()))


def lexical_similarity(candidate: str, reference: str) -> float:
    """The default lexical metric: 0.5 * rouge_l_f1 + 0.5 * number_overlap_f1, in [0, 1].

    Exact definition: with c = clean_text(candidate) and r = clean_text(reference) (calculator
    annotations ``<<...>>`` removed, the '####' marker removed but its final number kept),
    return 0.5 * rouge_l_f1(c, r) + 0.5 * number_overlap_f1(c, r). A candidate with no word or
    number token scores 0.0, so an empty generation never earns the "no numbers on either side"
    credit of number_overlap_f1.
    """
    candidate, reference = clean_text(candidate), clean_text(reference)
    if not _rouge_tokens(candidate):
        return 0.0
    return 0.5 * rouge_l_f1(candidate, reference) + 0.5 * number_overlap_f1(candidate, reference)


def _squad_tokens(text: str) -> list[str]:
    """SQuAD answer normalisation: lowercase, drop punctuation and articles, split on spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1, the original U† study's lexical metric (a variant).

    Both texts first go through clean_text (as in lexical_similarity), then SQuAD normalisation:
    lowercase, punctuation removed (so "1,000" becomes "1000" and "2.5" becomes "25"), articles
    a/an/the removed, split on whitespace. 0.0 when either side has no token.
    """
    candidate_tokens = Counter(_squad_tokens(clean_text(candidate)))
    reference_tokens = Counter(_squad_tokens(clean_text(reference)))
    common = sum((candidate_tokens & reference_tokens).values())
    return _f1(common, sum(candidate_tokens.values()), sum(reference_tokens.values()))


Metric = Callable[[str, str], float]
AccuracyRule = Callable[[str, str, bool], float]  # (output, reference, finished) -> 0.0 or 1.0

LEXICAL_METRICS: dict[str, Metric] = {"rouge_numbers": lexical_similarity, "token_f1": token_f1}
ACCURACY_RULES: dict[str, AccuracyRule] = {
    "strict": strict_accuracy,
    "flexible": flexible_accuracy,
    "contains": contains_accuracy,  # the original U† study's rule
}
# lm-evaluation-harness's two gsm8k rules, exactly: reported beside ours (accuracy_<name>)
LM_EVAL_RULES: dict[str, AccuracyRule] = {
    "strict_match": lm_eval_strict_match,
    "flexible_extract": lm_eval_flexible_extract,
}


# The answer's line is complete: a marker, a number on the same line, then a line break.
ANSWER_STOP = re.compile(r"(?:####|answer\s+is|answer\s*:)[^\n]*\d[^\n]*\n", re.IGNORECASE)
# lm-evaluation-harness gsm8k: generation "until" the next "Question:"; the text is cut there.
QUESTION_STOP = re.compile(r"Question:")
STOP_PATTERNS = {"answer": ANSWER_STOP, "question": QUESTION_STOP, "none": None}
UTILITY_STOPS = ("answer", "none")  # what a pruning utility's generation may stop at
