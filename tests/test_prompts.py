"""Prompts: k-shot prompts really contain their exemplars (the original study's bug)."""

from __future__ import annotations

import pytest

from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.data.prompts import exemplars, format_prompt, worked_solution


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_k_shot_prompt_contains_each_exemplar(tokenizer, style):
    shots = exemplars(2)
    question = load_gsm8k("test")[0].question
    prompt = format_prompt(tokenizer, question, style, shots)
    for shot in shots:
        assert shot.question in prompt
        assert worked_solution(shot) in prompt
        assert "<<" not in worked_solution(shot)
    assert prompt.rstrip().endswith("Answer:") if style == "plain" else "assistant" in prompt[-30:]
    assert prompt.index(shots[-1].question) < prompt.index(question)


def test_zero_shot_chat_prompt_uses_the_template(tokenizer):
    prompt = format_prompt(tokenizer, "What is 2+2?", "chat", [])
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_exemplars_are_fixed():
    assert exemplars(3) == exemplars(3)
    assert exemplars(0) == []
