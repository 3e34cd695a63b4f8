"""GSM8K packaging and user data validation."""

from __future__ import annotations

import pytest

from bonsai_prune.data.problems import Problem, load_gsm8k, load_problems, sample_problems
from bonsai_prune.errors import DataError


def test_packaged_gsm8k_has_both_splits():
    test, train = load_gsm8k("test"), load_gsm8k("train")
    assert (len(test), len(train)) == (1319, 7473)
    assert test[0].final_answer == "18"
    assert "<<" not in test[0].solution and "####" not in test[0].solution


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no problems"),
        ('{"question": "q", "answer": "a #### 1"}\n{not json\n', "line 2 is not valid JSON"),
        ('{"question": "q"}\n', "line 1 lacks a non-empty string field 'answer'"),
        ("[1, 2]\n", "line 1 is not a JSON object"),
    ],
)
def test_bad_user_data_names_the_problem(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_problems(path)


def test_missing_user_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")


def test_sample_problems_is_seeded_and_bounded():
    pool = [Problem(f"q{i}", f"a #### {i}") for i in range(10)]
    assert sample_problems(pool, 4, seed=1) == sample_problems(pool, 4, seed=1)
    with pytest.raises(DataError, match="only 10"):
        sample_problems(pool, 11, seed=1)
