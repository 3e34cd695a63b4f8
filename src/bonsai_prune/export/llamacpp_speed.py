"""llama.cpp decode speed of a GGUF: the CPU speed-up users of a pruned model actually get.

Batch 1, greedy, a fixed prompt; the clock covers only the N decode steps after the prompt
was evaluated (prefill is timed apart), repeated, and the median is reported, so one noisy
repeat on a shared machine does not set the figure. Needs llama-cpp-python.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bonsai_prune.errors import ConfigError, ModelLoadError

DEFAULT_PROMPT = "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?\nAnswer:"


@dataclass(frozen=True)
class DecodeSpeed:
    """Median decode and prefill rates of one GGUF, and the raw repeats behind them."""

    path: str
    n_threads: int
    n_tokens: int
    decode_tokens_per_s: float  # median over repeats
    prefill_tokens_per_s: float  # median over repeats
    decode_repeats: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def measure_decode_speed(
    gguf_path: str | Path,
    n_tokens: int = 64,
    repeats: int = 5,
    n_threads: int = 2,
    prompt: str = DEFAULT_PROMPT,
) -> DecodeSpeed:
    """Decode tokens per second of ``gguf_path`` in llama.cpp (batch 1, greedy, median of
    ``repeats`` runs of ``n_tokens`` steps each, ``n_threads`` CPU threads)."""
    if n_tokens < 1 or repeats < 1 or n_threads < 1:
        raise ConfigError(
            f"n_tokens, repeats and n_threads must be at least 1, got {n_tokens}, {repeats}, {n_threads}"
        )
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            "llama.cpp speed needs llama-cpp-python; install it: pip install llama-cpp-python"
        ) from None
    path = Path(gguf_path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; export one first")
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=512,
        n_batch=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    decode, prefill = [], []
    for _ in range(repeats + 1):  # the first run warms caches and is not counted
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        prompt_done = time.perf_counter()
        _greedy_steps(llm, n_tokens)
        end = time.perf_counter()
        prefill.append(len(tokens) / (prompt_done - start))
        decode.append(n_tokens / (end - prompt_done))
    decode, prefill = decode[1:], prefill[1:]
    return DecodeSpeed(
        path=str(path),
        n_threads=n_threads,
        n_tokens=n_tokens,
        decode_tokens_per_s=statistics.median(decode),
        prefill_tokens_per_s=statistics.median(prefill),
        decode_repeats=tuple(decode),
    )


def _greedy_steps(llm, n_tokens: int) -> list[int]:
    """Feed back the argmax of the last logits ``n_tokens`` times; the tokens chosen."""
    chosen = []
    for _step in range(n_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
        chosen.append(token)
    return chosen


def greedy_tokens(llm, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """The ``n_tokens`` greedy continuation of ``prompt_ids`` by a ``llama_cpp.Llama``, chosen
    by argmax of its logits exactly as transformers' greedy generation does (no sampler).

    The ``Llama`` must be built with ``logits_all=True``: otherwise llama-cpp-python 0.3 leaves
    ``scores`` at zero and every token comes out as 0."""
    llm.reset()
    llm.eval(list(prompt_ids))
    return _greedy_steps(llm, n_tokens)
