"""Bad input: one line on stderr naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import tiny_llama

from bonsai_prune.cli import main
from bonsai_prune.models import ADAPTERS

PRUNE = ["prune", "--quiet", "--masks-per-round", "2", "--calib-samples", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files and model folders the bad inputs point at."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{oops\n')
    (root / "no_answer.jsonl").write_text('{"question": "q"}\n')
    (root / "not_a_model").mkdir()
    (root / "scores_bad.jsonl").write_text('{"prediction": "1"}\n')
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        root / "gpt2"
    )
    from transformers import AutoTokenizer

    from bonsai_prune.models.loading import dequantised_default

    tiny_llama().save_pretrained(root / "tiny_llama")
    AutoTokenizer.from_pretrained(dequantised_default()).save_pretrained(root / "tiny_llama")
    return root


# (arguments, words the one-line message must contain); {root} is the fixture folder
CASES = {
    "sparsity not a number": (["--sparsity", "abc"], "invalid float value: 'abc'"),
    "sparsity above 1": (["--sparsity", "1.5"], "sparsity must be in (0, 1), got 1.5"),
    "sparsity zero": (["--sparsity", "0"], "sparsity must be in (0, 1), got 0"),
    "prune fraction 1": (["--prune-frac", "1"], "prune fraction must be in (0, 1)"),
    "masks per round below 2": (
        ["--masks-per-round", "1"],
        "masks per round must be an even number >= 2",
    ),
    "no calibration samples": (["--calib-samples", "0"], "calibration samples must be at least 1"),
    "more calibration samples than data": (["--calib-samples", "9000"], "only 7473"),
    "weights not summing to 100": (["--weights", "acc=50,lex=25"], "must sum to 100"),
    "negative weight": (
        ["--weights", "acc=110,lex=-10,sem=0"],
        "lex=-10.0 must be a finite number >= 0",
    ),
    "unknown metric": (["--weights", "acc=50,foo=50"], "foo"),
    "unknown utility": (
        ["--utility", "bleu"],
        "unknown utility 'bleu'; choose one of: comprehensive, perplexity",
    ),
    "unknown prior": (["--prior", "fisher"], "unknown prior 'fisher'; choose one of"),
    "missing model path": (["--model", "{root}/nope"], "does not exist"),
    "folder that is not a model": (["--model", "{root}/not_a_model"], "not a model directory"),
    "unreachable hub id": (["--model", "nobody/no-such-model-xyz"], "cannot reach model"),
    "unsupported architecture": (
        ["--model", "{root}/gpt2"],
        f"'gpt2' is not supported yet; supported: {', '.join(ADAPTERS.names())}",
    ),
    "missing data file": (["--data", "{root}/nope.jsonl"], "does not exist"),
    "empty data file": (["--data", "{root}/empty.jsonl"], "holds no problems"),
    "malformed data line": (["--data", "{root}/malformed.jsonl"], "line 2 is not valid JSON"),
    "data line without answer": (
        ["--data", "{root}/no_answer.jsonl"],
        "line 1 lacks a non-empty string field 'answer'",
    ),
    "unreachable target": (
        ["--model", "{root}/tiny_llama", "--units", "heads", "--sparsity", "0.9"],
        "unreachable",
    ),
}


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_prune_input(files, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = PRUNE + [a.format(root=files) for a in args] + ["--out", str(out)]
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err
    assert not out.exists() or not any(out.iterdir()), "a failed run left files behind"


@pytest.mark.parametrize(
    "name, message",
    [("missing.jsonl", "does not exist"), ("scores_bad.jsonl", "line 1")],
)
def test_bad_score_input(files, capsys, name, message):
    assert _run(["score", str(files / name), "--weights", "acc=50,lex=50,sem=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_non_empty_out_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _run(PRUNE + ["--out", str(out)]) == 2
    assert "not empty; pass --resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (
        out / "notes.txt"
    ).read_text() == "mine"


def test_score_command_writes_one_line_per_input(tmp_path, capsys):
    rows = [
        {"prediction": "So 9 * 2 = 18. #### 18", "reference": "9 * 2 = <<9*2=18>>18\n#### 18"},
        {"prediction": "It is 180", "reference": "#### 18"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored.jsonl"
    assert (
        _run(["score", str(source), "--weights", "acc=50,lex=50,sem=0", "--out", str(scored)]) == 0
    )
    aggregate = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [line["accuracy"] for line in lines] == [1.0, 0.0]
    assert lines[1]["accuracy_contains"] == 1.0  # the contains rule's false positive
    assert aggregate["n"] == 2 and aggregate["accuracy"] == 0.5


def test_subprocess_error_has_no_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bonsai_prune.cli",
            *PRUNE,
            "--sparsity",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "bonsai-prune: error: sparsity must be in (0, 1), got 2.0; e.g. --sparsity 0.5"
    )


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse reports usage errors by exiting
        return int(e.code)


@pytest.mark.parametrize(
    "argv, kept",
    [
        (["evaluate", "--out", "x"], "finished batches are kept; run the same command to resume"),
        (["bench"], "nothing was written"),
    ],
)
def test_ctrl_c_says_what_the_command_kept(monkeypatch, capsys, argv, kept):
    from bonsai_prune import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_cmd_{argv[0]}", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"bonsai-prune: interrupted; {kept}"
