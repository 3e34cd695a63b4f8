"""U† as a utility: per-row stopping, one combiner, self references, the answer probability."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_llama_over

from bonsai_prune import config as config_module
from bonsai_prune.config import UtilityConfig
from bonsai_prune.core.metrics import ACCURACY_RULES, ANSWER_STOP
from bonsai_prune.data.calibration import build_batch, fit_length
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.data.prompts import worked_solution
from bonsai_prune.errors import ConfigError, PruningError, RunDirectoryError
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.utility import generation as generation_module
from bonsai_prune.utility import references
from bonsai_prune.utility.base import answer_probability, solution_nll, sub_model_nll
from bonsai_prune.utility.comprehensive import ComprehensiveUtility
from bonsai_prune.utility.generation import generate_greedy


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over the real vocabulary; untied, so its greedy text varies (a tied
    random model repeats the prompt's last token)."""
    return tiny_llama_over(tokenizer, tied=False)


@pytest.fixture(scope="module")
def problems():
    return load_gsm8k("train")[:3]


# --- generation with a cap: each row stops on its own -----------------------------------------


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("so 3 + 4 = 7.\n#### 18\n", True),
        ("The answer is 42.\n", True),
        ("the final answer is: $1,200\n", True),
        ("#### \n", False),  # no number on the marker's line
        ("The answer is 42.", False),  # the line is not finished yet
        ("3 + 4 = 7\n", False),  # no marker
    ],
)
def test_answer_stop_needs_a_finished_answer_line(text: str, stops: bool) -> None:
    assert (ANSWER_STOP.search(text) is not None) == stops


def test_rows_stop_at_their_own_pattern_and_batching_changes_nothing(model, tokenizer, monkeypatch):
    # a pattern the random model hits at different steps in different rows
    monkeypatch.setitem(generation_module.STOP_PATTERNS, "answer", re.compile("e"))
    prompts = ["Question: one\nAnswer:", "Question: a longer second prompt\nAnswer:"]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    together = generate_greedy(
        model, tokenizer, batch["input_ids"], batch["attention_mask"], 24, "answer"
    )
    assert together.finished == [True, True]
    for row in range(2):
        ids = batch["input_ids"][row : row + 1][:, batch["attention_mask"][row].bool()]
        alone = generate_greedy(model, tokenizer, ids, torch.ones_like(ids), 24, "answer")
        assert alone.token_ids[0] == together.token_ids[row]
        # the row ended at the first token whose text completes the pattern, not before
        tokens = together.token_ids[row]
        assert "e" in tokenizer.decode(tokens) and "e" not in tokenizer.decode(tokens[:-1])
        assert together.n_tokens[row] == len(tokens) <= 24
    capped = generate_greedy(
        model, tokenizer, batch["input_ids"], batch["attention_mask"], 3, "none"
    )
    assert capped.n_tokens == [3, 3] and capped.finished == [False, False]


def test_question_stop_cuts_the_text_before_the_next_question(model, tokenizer, monkeypatch):
    monkeypatch.setitem(generation_module.STOP_PATTERNS, "question", re.compile("e"))
    batch = tokenizer(["Question: x\nAnswer:"], add_special_tokens=False, return_tensors="pt")
    out = generate_greedy(
        model, tokenizer, batch["input_ids"], batch["attention_mask"], 24, "question"
    )
    # the real pattern is "Question:"; here any "e" ends the row, and only "Question:" is cut
    assert out.finished == [True]


# --- one combiner, batched sub-models equal single ones ---------------------------------------


def test_scoring_several_sub_models_in_one_batch_equals_scoring_each_alone(
    model, tokenizer, problems
):
    config = UtilityConfig(
        name="comprehensive",
        weights={"acc": 10, "prob": 30, "lex": 30, "sem": 30},
        gen_tokens=10,
    )
    utility = ComprehensiveUtility(config)
    installed = references.prepare_self_references(utility, model, tokenizer, problems)
    assert len(installed) == len(problems)
    batch = build_batch(tokenizer, problems)
    adapter = adapter_for(model)
    n_units = adapter.layout(model).n_units
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, n_units, generator=generator) > 0.4  # (3, U)
    masks[0] = True  # the unmasked model among them

    batched = utility.score_masks(
        model, batch, masks, lambda keep: adapter.apply_masks(model, keep)
    )
    alone = []
    for keep in masks:
        with adapter.apply_masks(model, keep):
            alone.append(utility(model, batch))
    assert batched == pytest.approx(alone, abs=1e-4)
    # self references: the unmasked model matches them on lex and sem (3 x 30 of 100 points
    # minus what accuracy and the answer probability cannot give it)
    assert alone[0] == max(alone)
    assert len(set(round(v, 6) for v in alone)) > 1


def test_self_references_are_stored_by_problem_and_reused(
    model, tokenizer, problems, tmp_path, monkeypatch
):
    config = UtilityConfig(name="comprehensive", weights={"lex": 100}, gen_tokens=6)
    first = references.prepare_self_references(
        ComprehensiveUtility(config), model, tokenizer, problems[:2], tmp_path
    )
    saved = (tmp_path / references.SELF_REFERENCES_FILE).read_text()
    assert references.problem_key(problems[0]) in saved

    calls = []
    real = references.generate_self_references

    def counting(model, tokenizer, missing, config, batch_size=8):
        calls.append([references.problem_key(p) for p in missing])
        return real(model, tokenizer, missing, config, batch_size)

    monkeypatch.setattr(references, "generate_self_references", counting)
    utility = ComprehensiveUtility(config)
    again = references.prepare_self_references(utility, model, tokenizer, problems, tmp_path)
    assert calls == [[references.problem_key(problems[2])]]  # only the new problem
    assert {k: again[k] for k in first} == first
    assert utility.self_references == again

    other = UtilityConfig(name="comprehensive", weights={"lex": 100}, gen_tokens=7)
    with pytest.raises(RunDirectoryError, match="generated with"):
        references.prepare_self_references(
            ComprehensiveUtility(other), model, tokenizer, problems, tmp_path
        )


def test_a_problem_without_a_self_reference_is_an_error(model, tokenizer, problems):
    utility = ComprehensiveUtility(UtilityConfig(name="comprehensive", weights={"lex": 100}))
    with pytest.raises(PruningError, match="no self reference"):
        utility(model, build_batch(tokenizer, problems[:1]))


def test_perplexity_utilities_need_no_references(model, tokenizer, problems):
    assert references.prepare_self_references(object(), model, tokenizer, problems) is None


def test_gold_references_are_whole_when_finished_and_a_prefix_when_cut(tokenizer, problems):
    solution = worked_solution(problems[0])
    whole, cut = references.gold_texts(tokenizer, problems[:1] * 2, [5, 5], [True, False])
    assert whole == solution
    assert cut == references.prefix_text(tokenizer, solution, 5) and len(cut) < len(solution)


# --- teacher forcing: the answer probability, and no perfect score for a full prompt ----------


def test_answer_mask_marks_exactly_the_final_answer_tokens(tokenizer, problems):
    batch = build_batch(tokenizer, problems)
    for row, problem in enumerate(problems):
        after = torch.roll(batch.input_ids[row], -1)[batch.answer_mask[row]]  # next tokens
        assert tokenizer.decode(after).strip() == problem.final_answer
        assert bool((batch.answer_mask[row] <= batch.target_mask[row]).all())


def test_answer_probability_is_the_geometric_mean_of_the_answer_token_probabilities(
    model, tokenizer, problems
):
    batch = build_batch(tokenizer, problems)
    probs = answer_probability(model, batch)  # (n,)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_p = torch.log_softmax(logits.float(), -1)
    for row in range(len(problems)):
        positions = torch.nonzero(batch.answer_mask[row])[:, 0]
        nexts = batch.input_ids[row, positions + 1]
        expected = math.exp(float(log_p[row, positions, nexts].mean()))
        assert float(probs[row]) == pytest.approx(expected, rel=1e-4)
        assert 0.0 < float(probs[row]) <= 1.0
    # several sub-models, one unpadded forward per problem: the same probabilities per row
    nll = sub_model_nll(model, batch, 2, batch.answer_mask)  # (2, n), no masks: equal rows
    assert torch.exp(-nll) == pytest.approx(probs[None].expand(2, -1), rel=1e-4)


def test_a_prompt_that_fills_max_length_keeps_its_solution_and_never_scores_zero(
    model, tokenizer, problems
):
    prompt_length = len(
        tokenizer(batch_prompt(tokenizer, problems[0]), add_special_tokens=False)["input_ids"]
    )
    batch = build_batch(tokenizer, problems[:1], max_length=prompt_length)  # prompt alone fills it
    assert int(batch.target_mask.sum()) > 0
    nll = solution_nll(model, batch)
    assert bool(torch.isfinite(nll).all()) and float(nll[0]) > 0


def batch_prompt(tokenizer, problem) -> str:
    return build_batch(tokenizer, [problem]).prompts[0]


def test_fit_length_cuts_the_prompt_from_the_left_then_the_solution_tail():
    assert fit_length([1, 2, 3], [7, 8], 10) == [1, 2, 3, 7, 8]
    assert fit_length([1, 2, 3], [7, 8], 4) == [2, 3, 7, 8]
    assert fit_length([1, 2, 3], [7, 8, 9], 3) == [3, 7, 8]  # one prompt token always stays
    with pytest.raises(ValueError):
        fit_length([1], [2], 1)


# --- config ------------------------------------------------------------------------------------


def test_gold_references_need_exemplars_in_the_prompt():
    with pytest.raises(ConfigError, match="shots >= 1"):
        UtilityConfig(reference="gold")
    assert UtilityConfig(reference="gold", shots=2).shots == 2


def test_config_choices_come_from_the_modules_that_implement_them():
    import dataclasses

    choices = {
        f.name: f.metadata.get("choices") for f in dataclasses.fields(config_module.UtilityConfig)
    }
    assert choices["accuracy"] == tuple(ACCURACY_RULES)
    assert set(choices["stop"]) <= set(generation_module.STOP_PATTERNS)
    assert choices["reference"] == config_module.REFERENCE_KINDS
