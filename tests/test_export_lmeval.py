"""The offline lm-eval task: data written next to the YAML, and the task equal to lm-eval's own
gsm8k apart from where the data comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.export.lmeval import TASK_NAME, lm_eval_command, write_task


def test_write_task_points_at_local_copies_in_file_order(tmp_path):
    folder = write_task(tmp_path / "task")
    task = yaml.safe_load((folder / f"{TASK_NAME}.yaml").read_text())
    files = task["dataset_kwargs"]["data_files"]
    assert task["task"] == TASK_NAME and task["dataset_path"] == "json"
    first = json.loads(Path(files["test"]).read_text().splitlines()[0])
    assert first["question"] == load_gsm8k("test")[0].question  # --limit N = evaluate's first N
    assert len(Path(files["train"]).read_text().splitlines()) == 7473


def test_task_matches_lm_evals_gsm8k_except_the_data(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install lm-eval)")
    stock_path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    stock = yaml.safe_load(stock_path.read_text())
    ours = yaml.safe_load((write_task(tmp_path) / f"{TASK_NAME}.yaml").read_text())
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == {
        k: v for k, v in stock.items() if k not in data_keys
    }


def test_command_names_the_task_and_trusts_remote_code(tmp_path):
    command = lm_eval_command(tmp_path / "model", tmp_path / "task", limit=20)
    assert command[-2:] == ["--limit", "20"]
    assert any(a.endswith("trust_remote_code=True") for a in command)
    assert TASK_NAME in command
