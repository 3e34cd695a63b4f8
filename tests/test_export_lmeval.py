"""The offline lm-eval task: data written next to the YAML, and the task equal to lm-eval's own
gsm8k apart from where the data comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bonsai_prune.config import EvalConfig
from bonsai_prune.core.metrics import strict_accuracy
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.data.prompts import exemplars, format_prompt, worked_solution
from bonsai_prune.eval.gsm8k import evaluate
from bonsai_prune.export.lmeval import (
    CHAT_TASK,
    SAME_PROMPT_TASK,
    TASK_NAME,
    lm_eval_command,
    write_task,
)
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.pruned import save_model


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


def test_same_prompt_task_uses_evaluates_exemplars_first_n(tmp_path):
    folder = write_task(tmp_path / "task", shots=3)
    task = yaml.safe_load((folder / f"{SAME_PROMPT_TASK}.yaml").read_text())
    assert task["num_fewshot"] == 3 and task["fewshot_config"] == {"sampler": "first_n"}
    shots = [
        json.loads(x)
        for x in Path(task["dataset_kwargs"]["data_files"]["exemplars"]).read_text().splitlines()
    ]
    assert [s["answer"] for s in shots] == [worked_solution(p) for p in exemplars(3)]
    stock = yaml.safe_load((folder / f"{TASK_NAME}.yaml").read_text())
    kept = {"task", "dataset_kwargs", "fewshot_split", "fewshot_config", "num_fewshot"}
    assert {k: v for k, v in task.items() if k not in kept} == {
        k: v for k, v in stock.items() if k not in kept
    }


def test_chat_task_changes_only_the_prompt_shots_and_stops(tmp_path):
    folder = write_task(tmp_path / "task")
    task = yaml.safe_load((folder / f"{CHAT_TASK}.yaml").read_text())
    stock = yaml.safe_load((folder / f"{TASK_NAME}.yaml").read_text())
    assert task["num_fewshot"] == 0 and task["generation_kwargs"]["until"] == ["<|im_end|>"]
    kept = {"task", "doc_to_text", "num_fewshot", "generation_kwargs"}
    assert {k: v for k, v in task.items() if k not in kept} == {
        k: v for k, v in stock.items() if k not in kept
    }
    assert "--apply_chat_template" in lm_eval_command(tmp_path, folder, task=CHAT_TASK)
    assert "--apply_chat_template" not in lm_eval_command(tmp_path, folder)


def test_lm_eval_writes_evaluates_chat_prompt(tmp_path, tokenizer):
    """lm-eval's context for the chat task, through the model's chat template as lm-eval's hf
    model applies it, is the text `evaluate` feeds the model (prompt chat, zero-shot)."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install .[lmeval])")
    from lm_eval.tasks import TaskManager

    folder = write_task(tmp_path / "task")
    task = TaskManager(include_path=str(folder)).load([CHAT_TASK])["tasks"][CHAT_TASK]

    def chat_template(history, add_generation_prompt=True):  # lm_eval HFLM.apply_chat_template
        return tokenizer.apply_chat_template(
            history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    problems = load_gsm8k("test")[:3]
    for doc, problem in zip(list(task.test_docs())[:3], problems, strict=True):
        context = task.fewshot_context(
            doc, 0, apply_chat_template=True, chat_template=chat_template
        )
        assert context == format_prompt(tokenizer, problem.question, "chat")


@pytest.mark.slow
def test_lm_eval_generates_what_evaluate_does_on_a_pruned_folder(tmp_path):
    """lm-eval (remote code, offline task) and `evaluate --prompt plain --shots 2` write the
    same text for the same problems, and the two strict rules agree on it."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install .[lmeval])")
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model("default", dtype="fp32")
    adapter = adapter_for(model)
    keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
    for m in adapter.layout(model).modules:  # uneven groups in layer 0, a narrower MLP in layer 1
        if m.name == "layer0.heads":
            keep[m.offset : m.offset + 4] = False
        if m.name == "layer1.neurons":
            keep[m.offset : m.offset + 300] = False
    adapter.slice(model, keep)
    folder = save_model(tmp_path / "run", model, tokenizer, adapter.structure(model))
    task_dir = write_task(tmp_path / "task", shots=2)
    limit, tokens = 3, 48
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=[SAME_PROMPT_TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=limit,
        batch_size=1,
        device="cpu",
        log_samples=True,
        gen_kwargs=f"max_gen_toks={tokens}",
    )
    theirs = {}
    for row in results["samples"][SAME_PROMPT_TASK]:
        theirs.setdefault(row["doc_id"], {})[row["filter"]] = row
    config = EvalConfig(prompt="plain", shots=2, limit=limit, max_new_tokens=tokens, n_bootstrap=10)
    ours = evaluate(config, model=model, tokenizer=tokenizer, progress=False).records
    for record in ours:
        strict = theirs[record["index"]]["strict-match"]
        text = strict["resps"][0][0]
        assert record["prediction"].strip() == text.strip()
        assert strict_accuracy(text, record["reference"]) == float(strict["exact_match"])
