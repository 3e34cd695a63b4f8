"""GSM8K evaluation of a model fanned out over workers, with the serial run's outputs.

``eval.gsm8k.generate_solutions`` sorts the prompts longest first and generates them in
batches of ``batch_size``. Left padding makes a batch's outputs depend on which prompts share
it, so here the same batches are cut and each is one job: a replica generates exactly the batch
the serial run would, and the texts and token counts are the serial ones. The generating
function is passed in (it travels by name), so this module imports nothing from ``eval/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

from bonsai_prune.distributed.pool import EvaluatorPool


def serial_batches(tokenizer, prompts: list[str], batch_size: int) -> list[list[int]]:
    """The prompt indices of each batch ``generate_solutions`` makes (longest first)."""
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_on_workers(
    pool: EvaluatorPool,
    generate: Callable,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
):
    """``generate(model, tokenizer, prompts, ...)`` with its batches spread over the pool.

    generate: ``eval.gsm8k.generate_solutions`` (module level, so it pickles by name).
    Returns its Generations in prompt order; ``seconds`` sums the workers' generation time.
    """
    batches = serial_batches(tokenizer, prompts, batch_size)
    job = partial(generate, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    args = [(tokenizer, [prompts[i] for i in rows]) for rows in batches]
    results = pool.map(job, args, [len(rows) for rows in batches], "generating", progress)
    texts, n_new = [""] * len(prompts), [0] * len(prompts)
    for rows, result in zip(batches, results, strict=True):
        for j, row in enumerate(rows):
            texts[row], n_new[row] = result.texts[j], result.n_new_tokens[j]
    seconds = sum(result.seconds for result in results)
    return replace(results[0], texts=texts, n_new_tokens=n_new, seconds=seconds)
