"""Prompts for GSM8K: the model's chat template or plain text, zero-shot or k-shot.

k-shot exemplars are worked train solutions (annotations stripped, ending with the
'#### answer' line) so the model sees the answer format it is scored on. The original U†
study meant to use a one-shot exemplar but never put it in the prompt; ``tests/test_prompts``
checks that ours are really there.
"""

from __future__ import annotations

import random

from bonsai_prune.data.problems import Problem, load_gsm8k, strip_annotations

PROMPT_STYLES = ("chat", "plain")
INSTRUCTION = "Solve the math problem step by step. End with '#### <final answer>'."


def exemplars(k: int, seed: int = 1234) -> list[Problem]:
    """A fixed draw of ``k`` GSM8K train problems used as worked examples."""
    if k == 0:
        return []
    return random.Random(seed).sample(load_gsm8k("train"), k)


def worked_solution(problem: Problem) -> str:
    """The reference answer as a model should write it: no calculator annotations."""
    return strip_annotations(problem.answer).strip()


def format_prompt(tokenizer, question: str, style: str = "chat", shots: list[Problem] = ()) -> str:
    """The text fed to the model before it writes its solution."""
    if style == "chat" and getattr(tokenizer, "chat_template", None):
        messages = []
        for shot in shots:
            messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{shot.question}"})
            messages.append({"role": "assistant", "content": worked_solution(shot)})
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"Question: {s.question}\nAnswer: {worked_solution(s)}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"
