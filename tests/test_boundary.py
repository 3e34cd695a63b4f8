"""Every command's inputs are checked where they enter: files, numbers, names, model folders.

Each bad input ends in one line on stderr naming the problem and the fix, exit code 2, no
traceback, and no output that looks complete (issue 14's second battery and more of each kind).
"""

from __future__ import annotations

import json
import shutil

import pytest

from bonsai_prune.cli import main

PRUNE = ["prune", "--quiet", "--masks-per-round", "2", "--calib-samples", "1"]
GOOD = '{"question": "q", "answer": "2 + 2 = 4\\n#### 4"}\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Bad files and model folders; {root} in the tables below is this folder."""
    return make_bad_inputs(tmp_path_factory.mktemp("bad_inputs"), tiny_model_dir)


def make_bad_inputs(root, tiny_model_dir):
    (root / "latin1.jsonl").write_bytes(
        GOOD.encode() + '{"question": "café", "answer": "#### 1"}\n'.encode("latin-1")
    )
    (root / "no_hashes.jsonl").write_text(GOOD + '{"question": "q", "answer": "it is 4"}\n')
    (root / "word_answer.jsonl").write_text('{"question": "q", "answer": "so #### four"}\n')
    (root / "empty_answer.jsonl").write_text('{"question": "q", "answer": "so ####"}\n')
    (root / "two_numbers.jsonl").write_text('{"question": "q", "answer": "#### 4 or 5"}\n')
    (root / "a_folder.jsonl").mkdir()
    (root / "latin1_scores.jsonl").write_bytes(
        '{"prediction": "é", "reference": "#### 1"}\n'.encode("latin-1")
    )
    (root / "latin1_grid.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "a_file").write_text("not a folder")

    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    header_cut = root / "header_cut"
    shutil.copytree(tiny_model_dir, header_cut)
    (header_cut / "model.safetensors").write_bytes(b"\x10\x00")
    bad_config = root / "bad_config"
    shutil.copytree(tiny_model_dir, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama",')
    unfinished = root / "unfinished_run"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    (unfinished / "report.json").write_text(json.dumps({"complete": False}))
    return root


# (arguments, words the one-line message must contain)
PRUNE_CASES = {
    # files
    "data not UTF-8": (["--data", "{root}/latin1.jsonl"], "is not valid UTF-8 (line 2"),
    "answer without ####": (
        ["--data", "{root}/no_hashes.jsonl"],
        "line 2: the answer has no numeric final answer after '####' (\"no '####'\")",
    ),
    "answer a word": (["--data", "{root}/word_answer.jsonl"], "after '####' ('four')"),
    "answer empty after ####": (["--data", "{root}/empty_answer.jsonl"], "after '####' ('')"),
    "answer two numbers": (["--data", "{root}/two_numbers.jsonl"], "('4 or 5')"),
    "data a folder": (["--data", "{root}/a_folder.jsonl"], "is not a file"),
    "data empty string": (["--data", ""], "data must be a non-empty string"),
    # numbers
    "negative seed": (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    "seed too large": (["--seed", str(2**40)], "seed must be an integer in [0, 4294967295]"),
    "seed not an integer": (["--seed", "1.5"], "invalid int value: '1.5'"),
    "masks per forward 0": (["--masks-per-forward", "0"], "masks per forward must be at least 1"),
    "masks per forward negative": (["--masks-per-forward", "-4"], "at least 1, got -4"),
    "odd masks per round": (["--masks-per-round", "3"], "an even number >= 2"),
    "negative calibration samples": (["--calib-samples", "-1"], "at least 1, got -1"),
    "gen tokens 0": (["--gen-tokens", "0"], "gen_tokens must be an integer >= 1, got 0"),
    "max length 1": (["--max-length", "1"], "max_length must be an integer >= 2, got 1"),
    "shots 9": (["--shots", "9"], "shots must be an integer in [0, 8], got 9"),
    "shots negative": (["--shots", "-1"], "shots must be an integer in [0, 8], got -1"),
    "tolerance 0": (["--tolerance", "0"], "tolerance must be a number in (0, sparsity=0.3)"),
    "tolerance above sparsity": (["--tolerance", "0.5"], "got 0.5"),
    "tolerance nan": (["--tolerance", "nan"], "tolerance must be a number in (0, sparsity"),
    "sparsity nan": (["--sparsity", "nan"], "sparsity must be a number in (0, 1), got nan"),
    "sparsity inf": (["--sparsity", "inf"], "sparsity must be in (0, 1), got inf"),
    "prune fraction negative": (["--prune-fraction", "-0.1"], "prune fraction must be in (0, 1)"),
    # names
    "unknown method": (["--method", "sparsegpt"], "unknown method 'sparsegpt'"),
    "unknown dtype": (["--dtype", "int8"], "invalid choice: 'int8'"),
    "model empty string": (["--model", ""], "model must be a non-empty string"),
    # model folders
    "truncated safetensors": (
        ["--model", "{root}/truncated"],
        "model.safetensors is truncated (",
    ),
    "safetensors without header": (["--model", "{root}/header_cut"], "no header"),
    "config.json not JSON": (["--model", "{root}/bad_config"], "config.json is not valid JSON"),
    "run directory without model": (
        ["--model", "{root}/unfinished_run"],
        "is a run directory without a model",
    ),
    "model a file": (["--model", "{root}/a_file"], "not a model directory"),
    "hub id offline": (["--model", "nobody/nothing"], "(HF_HUB_OFFLINE is set)"),
}

EVALUATE_CASES = {
    "limit 0": (["--limit", "0"], "limit must be an integer >= 1"),
    "limit negative": (["--limit", "-5"], "got -5"),
    "batch size 0": (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    "max new tokens 0": (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    "bootstrap 0": (["--n-bootstrap", "0"], "n_bootstrap must be an integer >= 1"),
    "negative seed": (["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    "truncated safetensors": (["--model", "{root}/truncated"], "is truncated ("),
    "run directory without model": (["--model", "{root}/unfinished_run"], "without a model"),
    "missing model": (["--model", "{root}/nope"], "does not exist"),
    "split": (["--split", "dev"], "invalid choice: 'dev'"),
}

OTHER_CASES = {
    "score file not UTF-8": (["score", "{root}/latin1_scores.jsonl"], "is not valid UTF-8"),
    "score file a folder": (["score", "{root}/a_folder.jsonl"], "is not a file"),
    "grid not UTF-8": (["experiment", "{root}/latin1_grid.yaml"], "is not valid UTF-8"),
    "out is a file": (PRUNE + ["--out", "{root}/a_file"], "is a file; give a directory"),
    "evaluate out is a file": (
        ["evaluate", "--limit", "1", "--out", "{root}/a_file"],
        "--out {root}/a_file is a file; give a directory",
    ),
    "evaluate out under a file": (
        ["evaluate", "--limit", "1", "--out", "{root}/a_file/eval"],
        "a_file is a file, not a folder",
    ),
    "score out is a folder": (
        ["score", "{root}/latin1_scores.jsonl", "--out", "{root}/a_folder.jsonl"],
        "is a folder; give a file name",
    ),
    "bench out is a folder": (["bench", "--out", "{root}/a_folder.jsonl"], "is a folder"),
}


def _check_refused(capsys, argv, message) -> str:
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err
    return err


@pytest.mark.parametrize("args, message", PRUNE_CASES.values(), ids=PRUNE_CASES.keys())
def test_bad_prune_input(files, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    _check_refused(
        capsys, PRUNE + [a.format(root=files) for a in args] + ["--out", str(out)], message
    )
    assert not out.exists() or not any(out.iterdir()), "a refused run left files behind"


@pytest.mark.parametrize("args, message", EVALUATE_CASES.values(), ids=EVALUATE_CASES.keys())
def test_bad_evaluate_input(files, tmp_path, capsys, args, message):
    out = tmp_path / "eval"
    argv = ["evaluate", "--quiet", *[a.format(root=files) for a in args], "--out", str(out)]
    _check_refused(capsys, argv, message)
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("args, message", OTHER_CASES.values(), ids=OTHER_CASES.keys())
def test_bad_input_of_other_commands(files, capsys, args, message):
    _check_refused(capsys, [a.format(root=files) for a in args], message.format(root=files))


def test_packaged_gsm8k_passes_the_answer_check():
    from bonsai_prune.data.problems import is_numeric_answer, load_gsm8k

    assert all(is_numeric_answer(p.answer) for p in load_gsm8k("test"))
    for good in ("#### 1,200", "#### -3", "#### $5", "#### 0.5", "x\n#### 7 "):
        assert is_numeric_answer(good), good


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse reports usage errors by exiting
        return int(e.code)
