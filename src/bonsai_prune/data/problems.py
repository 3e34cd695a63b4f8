"""GSM8K problems: the packaged copy (MIT licence, see data/gsm8k/LICENSE) or a user's JSONL.

A problem is a question and its reference solution; the solution ends with ``#### <answer>``
and carries ``<<expr=value>>`` calculator annotations that no metric should see.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bonsai_prune.errors import DataError
from bonsai_prune.validation import read_text_lines

SPLITS = ("train", "test")
_ANNOTATION = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


@dataclass(frozen=True)
class Problem:
    """One GSM8K problem."""

    question: str
    answer: str  # full reference solution, with '#### <final answer>'

    @property
    def solution(self) -> str:
        """Reference reasoning without calculator annotations and without the final '####' line."""
        return strip_annotations(self.answer.split("####")[0]).strip()

    @property
    def final_answer(self) -> str:
        return final_answer(self.answer)


def strip_annotations(text: str) -> str:
    """Remove GSM8K ``<<48/2=24>>`` calculator annotations."""
    return _ANNOTATION.sub("", text)


def final_answer(answer: str) -> str:
    """The text after the last '####' (the reference final answer), or the whole string."""
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def is_numeric_answer(answer: str) -> bool:
    """Whether a reference solution ends in ``#### <number>`` (GSM8K's form: '1,200', '-3', '$5')."""
    if "####" not in answer:
        return False
    number = final_answer(answer).replace(",", "").replace("$", "").strip()
    return _NUMBER.fullmatch(number) is not None


def load_gsm8k(split: str = "test") -> list[Problem]:
    """Load the packaged GSM8K split ('train' 7,473 problems, 'test' 1,319)."""
    if split not in SPLITS:
        raise DataError(f"unknown GSM8K split {split!r}; choose one of: {', '.join(SPLITS)}")
    ref = resources.files("bonsai_prune") / "data" / "gsm8k" / f"{split}.jsonl.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return _parse_lines(f, source=f"packaged GSM8K {split}")


def load_problems(path: str | Path) -> list[Problem]:
    """Load a user's JSONL file of ``{"question", "answer"}`` lines, checking every line."""
    lines = read_text_lines(path, "data file", "a JSONL file of question/answer lines")
    return _parse_lines(lines, source=str(path))


def json_objects(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSONL line; a bad line raises DataError naming it."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source} line {number} is not a JSON object")
        yield number, row


def _parse_lines(lines, source: str) -> list[Problem]:
    problems = []
    for number, row in json_objects(lines, source):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{source} line {number} lacks a non-empty string field {key!r}")
        if not is_numeric_answer(row["answer"]):
            got = final_answer(row["answer"])[:40] if "####" in row["answer"] else "no '####'"
            raise DataError(
                f"{source} line {number}: the answer has no numeric final answer after '####' "
                f"({got!r}); end each answer with '#### <number>', e.g. '#### 42'"
            )
        problems.append(Problem(row["question"], row["answer"]))
    if not problems:
        raise DataError(f"{source} holds no problems; give at least one question/answer line")
    return problems


def sample_problems(problems: list[Problem], n: int, seed: int) -> list[Problem]:
    """A fixed, seeded draw of ``n`` problems without replacement (all of them, shuffled, if n>=len)."""
    if n < 1:
        raise DataError(f"asked for {n} problems; ask for at least 1")
    if n > len(problems):
        raise DataError(f"asked for {n} problems but the data has only {len(problems)}")
    return random.Random(seed).sample(problems, n)
