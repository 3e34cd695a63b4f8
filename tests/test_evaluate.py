"""Evaluation: config checks, token counting, and a run on a tiny random Llama."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_over

from bonsai_prune.config import EvalConfig
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.errors import ConfigError, DataError
from bonsai_prune.eval.gsm8k import (
    add_answer_probabilities,
    evaluate,
    format_summary,
    generate_solutions,
)
from bonsai_prune.utility.combine import score_texts

TINY_WEIGHTS = {"acc": 50, "lex": 50, "sem": 0}  # sem=0: no embedding model is loaded


# --- EvalConfig ---------------------------------------------------------------------------------

BAD_CONFIGS = {
    "limit": ({"limit": 0}, "limit"),
    "limit is a bool": ({"limit": True}, "limit"),
    "batch_size": ({"batch_size": 0}, "batch_size"),
    "max_new_tokens": ({"max_new_tokens": -5}, "max_new_tokens"),
    "max_new_tokens float": ({"max_new_tokens": 2.5}, "max_new_tokens"),
    "n_bootstrap": ({"n_bootstrap": 0}, "n_bootstrap"),
    "shots": ({"shots": 9}, "shots"),
    "seed": ({"seed": -1}, "seed"),
    "dtype": ({"dtype": "fp8"}, "dtype 'fp8'"),
    "device": ({"device": "tpu"}, "device 'tpu'"),
    "split": ({"split": "dev"}, "split 'dev'"),
    "prompt": ({"prompt": "fancy"}, "prompt style 'fancy'"),
    "accuracy": ({"accuracy": "fuzzy"}, "accuracy rule 'fuzzy'"),
    "lexical": ({"lexical": "bleu"}, "lexical metric 'bleu'"),
    "weights": ({"weights": {"acc": 50, "lex": 25}}, "sum to 100"),
    "model": ({"model": ""}, "model"),
}


@pytest.mark.parametrize("kwargs, named", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_config_rejects_bad_values_in_one_line_naming_the_field(kwargs, named):
    with pytest.raises(ConfigError) as caught:
        EvalConfig(**kwargs)
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert repr(next(iter(kwargs.values()))) in message or "weights" in kwargs


def test_config_round_trips_through_json_and_refuses_unknown_keys():
    config = EvalConfig(limit=5, weights={"accuracy": 60, "lex": 20, "sem": 20}, shots=2)
    assert config.weights == {"acc": 60.0, "lex": 20.0, "sem": 20.0, "prob": 0.0}
    data = json.loads(json.dumps(config.to_dict()))
    assert EvalConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="max_tokens"):
        EvalConfig.from_dict({**data, "max_tokens": 3})


# --- generation bookkeeping ---------------------------------------------------------------------


class EchoModel:
    """generate() repeats each prompt's last token: shows which prompt each output came from."""

    device = torch.device("cpu")
    generation_config = SimpleNamespace(eos_token_id=None)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        return torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)


def test_generation_sorts_by_length_and_restores_the_order(tokenizer):
    prompts = ["apple", "a much longer prompt about a banana", "cherry pie with cream", "plum"]
    out = generate_solutions(
        EchoModel(), tokenizer, prompts, max_new_tokens=2, batch_size=3, progress=False
    )
    last = [tokenizer(p, add_special_tokens=False)["input_ids"][-1] for p in prompts]
    assert out.texts == [tokenizer.decode([t, t]).strip() for t in last]
    assert out.n_new_tokens == [2, 2, 2, 2]
    assert out.seconds >= 0


class ScriptModel:
    """generate() writes a fixed continuation token by token and, like transformers, asks the
    stopping criteria after each token and pads the rows they mark done."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, continuation: str) -> None:
        self.script = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        self.pad = tokenizer.pad_token_id
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for token in self.script[:max_new_tokens]:
            column = torch.where(done, self.pad, token)[:, None]  # (B, 1)
            input_ids = torch.cat([input_ids, column], dim=1)
            done |= stopping_criteria[0](input_ids, None)
            if bool(done.all()):
                break
        return input_ids


def test_plain_k_shot_stops_at_the_next_question_and_takes_the_first_answer(tokenizer):
    continuation = "3 + 4 = 7 apples.\n#### 7\n\nQuestion: Tom has 9 pears\nAnswer: #### 9"
    model = ScriptModel(tokenizer, continuation)
    out = generate_solutions(
        model,
        tokenizer,
        ["Question: q\nAnswer:"],
        max_new_tokens=64,
        batch_size=1,
        stop="question",
        progress=False,
    )
    assert out.texts == ["3 + 4 = 7 apples.\n#### 7"] and out.finished == [True]
    assert out.n_new_tokens[0] < len(model.script)
    scores = score_texts(out.texts, ["#### 7"], {"acc": 100}, finished=out.finished)
    assert scores.aggregate["accuracy_strict"] == 1.0
    # without the stop, the made-up question runs to the cap and is scored too
    free = generate_solutions(
        model,
        tokenizer,
        ["Question: q\nAnswer:"],
        max_new_tokens=64,
        batch_size=1,
        stop="none",
        progress=False,
    )
    assert "Question: Tom" in free.texts[0] and free.finished == [False]


# --- evaluate() on a tiny random Llama ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama_over(tokenizer)


def test_evaluate_tiny_model_writes_files_and_sane_figures(tiny_model, tokenizer, tmp_path):
    config = EvalConfig(
        model="tiny-random-llama",
        dtype="fp32",
        limit=3,
        max_new_tokens=4,
        batch_size=2,
        weights=TINY_WEIGHTS,
        n_bootstrap=200,
    )
    result = evaluate(
        config, model=tiny_model, tokenizer=tokenizer, out_dir=tmp_path, progress=False
    )

    lines = (tmp_path / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records == result.records
    problems = load_gsm8k("test")[:3]  # the first n: every model sees the same problems
    assert [r["question"] for r in records] == [p.question for p in problems]
    assert [r["reference"] for r in records] == [p.answer for p in problems]
    for record in records:
        assert record["accuracy_strict"] in (0.0, 1.0)
        assert record["accuracy_contains"] in (0.0, 1.0)
        assert 0.0 <= record["lexical"] <= 1.0
        assert record["semantic"] is None  # weight 0: not computed
        assert 0.0 < record["answer_prob"] < 1.0  # weight 0, but reported
        assert 0.0 <= record["u_dagger"] <= 100.0
        assert 1 <= record["n_new_tokens"] <= 4

    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary == result.summary
    assert summary["n"] == 3 and summary["model"] == "tiny-random-llama"
    assert summary["config"] == config.to_dict()
    for key in ("accuracy_strict", "accuracy_contains"):
        low, high = summary[f"{key}_ci"]
        assert 0.0 <= low <= summary[key] <= high <= 1.0
    low, high = summary["u_dagger_ci"]
    assert 0.0 <= low <= summary["u_dagger"] <= high <= 100.0
    low, high = summary["answer_prob_ci"]
    assert 0.0 <= low <= summary["answer_prob"] <= high <= 1.0
    # a random model spreads probability over ~49k tokens: perplexity far above 1, finite
    assert math.isfinite(summary["reference_perplexity"]) and summary["reference_perplexity"] > 1
    assert summary["total_params"] == sum(p.numel() for p in tiny_model.parameters())
    assert 0 < summary["non_embedding_params"] < summary["total_params"]
    assert summary["param_bytes"] == 4 * summary["total_params"]  # fp32
    assert summary["size_on_disk_bytes"] is None  # a label, not a directory
    assert summary["n_new_tokens"] == sum(r["n_new_tokens"] for r in records)
    assert summary["decode_tokens_per_s"] > 0 and summary["peak_rss_bytes"] > 0
    assert summary["wall_s"] >= summary["generation_s"] > 0

    table = format_summary(summary)
    assert "accuracy (strict)" in table and "CI" in table and "tiny-random-llama" in table
    assert "answer probability" in table


def test_an_evaluation_saved_without_the_answer_probability_gains_it(
    tiny_model, tokenizer, tmp_path
):
    """Evaluations saved before the answer probability was reported gain it from the model they
    evaluated (the reference pass alone); another model is refused, nothing written."""
    config = EvalConfig(limit=3, max_new_tokens=3, batch_size=2, weights=TINY_WEIGHTS,
                        n_bootstrap=50)  # fmt: skip
    result = evaluate(config, model=tiny_model, tokenizer=tokenizer, out_dir=tmp_path,
                      progress=False)  # fmt: skip
    old_records = [{**r, "answer_prob": None} for r in result.records]
    old_summary = {**result.summary, "answer_prob": None, "answer_prob_ci": None}
    lines = "".join(json.dumps(r) + "\n" for r in old_records)
    (tmp_path / "generations.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "summary.json").write_text(json.dumps(old_summary), encoding="utf-8")

    other = type(tiny_model)(tiny_model.config)  # same shapes, other weights
    with pytest.raises(DataError, match="reference NLL recomputed differs"):
        add_answer_probabilities(tmp_path, other, tokenizer, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text())["answer_prob"] is None

    assert add_answer_probabilities(tmp_path, tiny_model, tokenizer, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").open()]
    assert summary == json.loads(json.dumps(result.summary))
    assert records == json.loads(json.dumps(result.records))
    assert not add_answer_probabilities(tmp_path, tiny_model, tokenizer, progress=False)


class Killed(Exception):
    """Stands for the process being killed mid-evaluation."""


def test_a_killed_evaluation_resumes_at_its_first_unfinished_batch(
    tiny_model, tokenizer, tmp_path, monkeypatch, capsys
):
    """Finished batches are journaled; run again, the evaluation generates only the rest and
    equals an uninterrupted one. A line the kill cut short is redone; another model's journal
    is not used; the journal goes once the results are written."""
    from bonsai_prune.eval import gsm8k
    from bonsai_prune.eval.journal import JOURNAL

    config = EvalConfig(limit=5, max_new_tokens=3, batch_size=2, weights=TINY_WEIGHTS,
                        n_bootstrap=50)  # fmt: skip
    whole = evaluate(config, model=tiny_model, tokenizer=tokenizer, progress=False)
    real, calls = gsm8k.generate_greedy, []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(args[2].shape[0])
        if len(calls) == 3:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(gsm8k, "generate_greedy", dies_on_the_third_batch)
    with pytest.raises(Killed):
        evaluate(config, model=tiny_model, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    journal = tmp_path / JOURNAL
    assert len(journal.read_text().splitlines()) == 3  # the header and two batches
    assert not (tmp_path / "summary.json").exists()
    with journal.open("a") as handle:
        handle.write('{"start": 4, "texts": ["cut sh')  # a write the kill interrupted
    calls.clear()
    resumed = evaluate(config, model=tiny_model, tokenizer=tokenizer, out_dir=tmp_path,
                       progress=False)  # fmt: skip
    assert calls == [1]  # the last batch only (5 prompts: 2 + 2 + 1)
    assert f"resuming {tmp_path}: 4 of 5 problems generated before" in capsys.readouterr().err
    assert resumed.records == whole.records
    assert not journal.exists()

    # a journal written for other weights is not taken
    with pytest.raises(Killed):
        calls.clear()
        evaluate(config, model=tiny_model, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    other = type(tiny_model)(tiny_model.config)  # same shapes, other weights
    calls.clear()
    monkeypatch.setattr(
        gsm8k, "generate_greedy", lambda *a: calls.append(a[2].shape[0]) or real(*a)
    )
    evaluate(config, model=other, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    assert calls == [2, 2, 1]


def test_evaluate_is_deterministic_and_sizes_a_model_directory(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "model_dir")
    config = EvalConfig(
        model=str(tmp_path / "model_dir"),
        limit=2,
        max_new_tokens=3,
        weights=TINY_WEIGHTS,
        n_bootstrap=50,
    )
    first = evaluate(config, model=tiny_model, tokenizer=tokenizer, progress=False)
    second = evaluate(config, model=tiny_model, tokenizer=tokenizer, progress=False)
    assert [r["prediction"] for r in first.records] == [r["prediction"] for r in second.records]
    files = (tmp_path / "model_dir").iterdir()
    assert first.summary["size_on_disk_bytes"] == sum(f.stat().st_size for f in files)


def test_evaluate_wants_both_model_and_tokenizer(tiny_model):
    with pytest.raises(ConfigError, match="both"):
        evaluate(EvalConfig(limit=1, weights=TINY_WEIGHTS), model=tiny_model, progress=False)
