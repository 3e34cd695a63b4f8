"""Two evaluations side by side: paired by problem, the right interval per figure, bad input
refused in one line."""

from __future__ import annotations

import json
import math

import pytest

from bonsai_prune.cli import main
from bonsai_prune.errors import DataError
from bonsai_prune.eval.compare import compare_evaluations, format_comparison


def _write_eval(folder, strict, nll, *, split="test", indices=None, max_new_tokens=256):
    """An evaluation folder as ``evaluate`` writes it, with per-problem figures given."""
    folder.mkdir(parents=True)
    indices = list(range(len(strict))) if indices is None else indices
    config = {"split": split, "prompt": "chat", "shots": 0, "max_new_tokens": max_new_tokens}
    (folder / "summary.json").write_text(json.dumps({"n": len(strict), "config": config}))
    with (folder / "generations.jsonl").open("w") as out:
        for i, s, n in zip(indices, strict, nll, strict=True):
            record = {
                "index": i,
                "question": f"question {i}",
                "accuracy_strict": s,
                "u_dagger": 20.0 + 5 * s,
                "reference_nll": n,
            }
            out.write(json.dumps(record) + "\n")
    return folder


def test_a_model_that_solved_none_is_compared_with_an_open_interval(tmp_path):
    dense = _write_eval(tmp_path / "dense", [1.0] * 5 + [0.0] * 295, [1.3] * 300)
    pruned = _write_eval(tmp_path / "pruned", [0.0] * 300, [1.6] * 300)
    c = compare_evaluations(pruned, dense)
    assert c.n == 300 and not c.settings_differ
    strict = c.rows["accuracy_strict"]
    assert strict["model"] == 0.0 and strict["baseline"] == pytest.approx(5 / 300)
    ratio, low, high = strict["kept"]
    assert ratio == 0.0 and low == 0.0 and high > 0.5  # a bootstrap would say [0, 0]
    assert strict["change"][0] == pytest.approx(-5 / 300) and strict["change"][2] < 0
    nll = c.rows["reference_nll"]
    assert nll["kept"] is None and nll["change"][0] == pytest.approx(0.3)
    assert "answer_prob" not in c.rows  # neither evaluation has it
    text = format_comparison(c)
    assert "0.00 [0.00, " in text and "+0.300" in text


def test_problems_are_paired_by_index_and_other_settings_are_noted(tmp_path):
    dense = _write_eval(tmp_path / "dense", [1.0, 0.0, 1.0, 0.0], [1.0] * 4)
    pruned = _write_eval(
        tmp_path / "pruned", [0.0, 1.0], [2.0, 2.0], indices=[2, 1], max_new_tokens=128
    )
    c = compare_evaluations(pruned, dense)
    assert c.n == 2
    assert c.rows["accuracy_strict"]["model"] == 0.5
    assert c.rows["accuracy_strict"]["baseline"] == 0.5  # problems 2 and 1 of the dense
    assert c.settings_differ == {"max_new_tokens": [128, 256]}
    assert "note: max_new_tokens differs" in format_comparison(c)


def test_evaluations_of_other_problems_are_refused(tmp_path):
    dense = _write_eval(tmp_path / "dense", [1.0, 0.0], [1.0, 1.0])
    train = _write_eval(tmp_path / "train", [1.0, 0.0], [1.0, 1.0], split="train")
    with pytest.raises(DataError, match="same split"):
        compare_evaluations(train, dense)
    apart = _write_eval(tmp_path / "apart", [1.0], [1.0], indices=[7])
    with pytest.raises(DataError, match="share no problem"):
        compare_evaluations(apart, dense)
    other = _write_eval(tmp_path / "other", [1.0, 0.0], [1.0, 1.0])
    lines = (other / "generations.jsonl").read_text().replace("question 1", "another")
    (other / "generations.jsonl").write_text(lines)
    with pytest.raises(DataError, match="another question"):
        compare_evaluations(other, dense)


def test_compare_command_prints_the_table_and_writes_json(tmp_path, capsys):
    dense = _write_eval(tmp_path / "dense", [1.0, 0.0, 1.0, 0.0] * 25, [1.0] * 100)
    pruned = _write_eval(tmp_path / "pruned", [1.0, 0.0, 0.0, 0.0] * 25, [1.2] * 100)
    out = tmp_path / "comparison.json"
    assert main(["compare", str(pruned), "--baseline", str(dense), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "100 problems both answered" in printed and "0.50 [" in printed
    saved = json.loads(out.read_text())
    assert saved["baseline"] == str(dense)
    ratio, low, high = saved["models"][str(pruned)]["figures"]["accuracy_strict"]["kept"]
    assert ratio == pytest.approx(0.5) and low < 0.5 < high and not math.isnan(high)


def test_several_models_are_compared_in_one_table(tmp_path, capsys):
    dense = _write_eval(tmp_path / "dense", [1.0, 0.0, 1.0, 0.0] * 25, [1.0] * 100)
    half = _write_eval(tmp_path / "half", [1.0, 0.0, 0.0, 0.0] * 25, [1.2] * 100)
    none = _write_eval(tmp_path / "none", [0.0] * 60, [1.5] * 60, max_new_tokens=128)
    out = tmp_path / "comparison.json"
    code = main(["compare", str(half), str(none), "--baseline", str(dense), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in printed if line.startswith(str(tmp_path))}
    assert rows[str(half)][1:4] == ["100", "25.0", "0.50"]
    assert rows[str(none)][1:4] == ["60", "0.0", "0.00"]  # its 60 problems, paired
    assert "+0.500" in " ".join(rows[str(none)])  # reference NLL 1.5 against 1.0
    assert any(f"{none}: max_new_tokens differs" in line for line in printed)
    saved = json.loads(out.read_text())["models"]
    assert saved[str(none)]["n"] == 60 and saved[str(half)]["n"] == 100


def test_several_models_are_all_checked_before_anything_is_written(tmp_path, capsys):
    dense = _write_eval(tmp_path / "dense", [1.0, 0.0], [1.0, 1.0])
    good = _write_eval(tmp_path / "good", [1.0, 0.0], [1.0, 1.0])
    out = tmp_path / "comparison.json"
    code = main(["compare", str(good), str(tmp_path), "--baseline", str(dense), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "not a finished evaluation" in captured.err
    assert not out.exists() and "baseline:" not in captured.out


def test_compare_command_refuses_a_folder_that_is_not_an_evaluation(tmp_path, capsys):
    dense = _write_eval(tmp_path / "dense", [1.0], [1.0])
    code = main(["compare", str(tmp_path), "--baseline", str(dense)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a finished evaluation" in err
