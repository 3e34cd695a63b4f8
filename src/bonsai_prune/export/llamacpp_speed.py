"""llama.cpp decode speed of a GGUF: the CPU speed-up users of a pruned model actually get.

Batch 1, greedy, a fixed prompt; the clock covers only the N decode steps after the prompt
was evaluated (prefill is timed apart), repeated, and the median is reported, so one noisy
repeat on a shared machine does not set the figure. ``compare_decode_speed`` times a pruned
GGUF against its dense parent's in alternating rounds and sets each ratio beside its ceiling,
the ratio of the weight bytes a decode step reads (``scripts/llamacpp_ab.py`` exports both
and prints the table). Needs llama-cpp-python.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
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
    _check_counts(n_tokens, repeats, n_threads)
    llm = _open(gguf_path, n_threads)
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    decode, prefill = [], []
    for _ in range(repeats + 1):  # the first run warms caches and is not counted
        prefill_s, decode_s = _time_once(llm, tokens, n_tokens)
        prefill.append(len(tokens) / prefill_s)
        decode.append(n_tokens / decode_s)
    decode, prefill = decode[1:], prefill[1:]
    return DecodeSpeed(
        path=str(gguf_path),
        n_threads=n_threads,
        n_tokens=n_tokens,
        decode_tokens_per_s=statistics.median(decode),
        prefill_tokens_per_s=statistics.median(prefill),
        decode_repeats=tuple(decode),
    )


@dataclass(frozen=True)
class DecodeComparison:
    """Batch-1 decode of several GGUFs timed in alternation, against the first (the baseline).

    ``speedup[name]`` holds one ratio per round (the baseline's ms per token over this
    model's, both timed in that round, so load on a shared machine hits both alike);
    ``ceiling[name]`` is the ratio of the weight bytes a decode step streams (every tensor
    once per token; the token embedding only where it is also the output head), the speed-up
    if decode were bound by memory traffic alone."""

    baseline: str
    n_threads: int
    n_tokens: int
    ms_per_token: dict[str, tuple[float, ...]]
    speedup: dict[str, tuple[float, ...]]
    weight_bytes: dict[str, int]
    ceiling: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def compare_decode_speed(
    gguf_paths: Mapping[str, str | Path],
    n_tokens: int = 64,
    rounds: int = 5,
    n_threads: int = 2,
    prompt: str = DEFAULT_PROMPT,
) -> DecodeComparison:
    """Time ``n_tokens`` greedy decode steps of every GGUF in ``gguf_paths`` (name -> file; the
    first is the baseline) once per round for ``rounds`` rounds, after one untimed warm-up
    each; the order within a round alternates so that neither side always runs first."""
    _check_counts(n_tokens, rounds, n_threads)
    if len(gguf_paths) < 2:
        raise ConfigError("compare at least two GGUF files: a baseline and a pruned model")
    models = {name: _open(path, n_threads) for name, path in gguf_paths.items()}
    names = list(models)
    tokens = {n: m.tokenize(prompt.encode("utf-8"), add_bos=True) for n, m in models.items()}
    for name in names:
        _time_once(models[name], tokens[name], n_tokens)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            _, decode_s = _time_once(models[name], tokens[name], n_tokens)
            ms[name].append(1000 * decode_s / n_tokens)
    baseline = names[0]
    nbytes = {name: weight_bytes(path) for name, path in gguf_paths.items()}
    return DecodeComparison(
        baseline=baseline,
        n_threads=n_threads,
        n_tokens=n_tokens,
        ms_per_token={name: tuple(v) for name, v in ms.items()},
        speedup={
            name: tuple(b / m for b, m in zip(ms[baseline], ms[name], strict=True))
            for name in names[1:]
        },
        weight_bytes=nbytes,
        ceiling={name: nbytes[baseline] / nbytes[name] for name in names[1:]},
    )


def weight_bytes(gguf_path: str | Path) -> int:
    """Bytes of weights one decode step reads: every tensor, except the token embedding when a
    separate output head exists (then a step reads one embedding row, a negligible share)."""
    import gguf

    tensors = gguf.GGUFReader(str(gguf_path)).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if not (untied and t.name == "token_embd.weight"))


def quantize(source: str | Path, out: str | Path, kind: str, n_threads: int = 2) -> Path:
    """``source`` (a GGUF) quantised to ``kind`` (llama.cpp's type name, e.g. ``Q4_K_M``) by
    llama.cpp's own quantiser, as ``llama-quantize`` does: tensors whose rows do not split into
    the type's blocks fall back to another type (a pruned MLP width to f16: export with
    ``mlp_multiple``)."""
    import ctypes

    llama_cpp = _llama_cpp("quantising")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_")
            for n in dir(llama_cpp)
            if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise ConfigError(f"unknown llama.cpp type {kind!r}; choose one of {', '.join(known)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, n_threads
    out = Path(out)
    if llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    ):
        raise ModelLoadError(f"llama.cpp could not quantise {source} to {kind}")
    return out


def _check_counts(n_tokens: int, repeats: int, n_threads: int) -> None:
    if n_tokens < 1 or repeats < 1 or n_threads < 1:
        raise ConfigError(
            f"token, repeat and thread counts must be at least 1, got {n_tokens}, {repeats}, "
            f"{n_threads}"
        )


def _llama_cpp(purpose: str):
    """The llama_cpp module, or a one-line error saying ``purpose`` needs it and how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise ModelLoadError(
            f"{purpose} needs llama-cpp-python; install it: pip install llama-cpp-python"
        ) from None
    return llama_cpp


def _open(gguf_path: str | Path, n_threads: int):
    """A ``llama_cpp.Llama`` on ``gguf_path``, or a one-line error naming what is missing."""
    llama_cpp = _llama_cpp("llama.cpp speed")
    path = Path(gguf_path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; export one first")
    return llama_cpp.Llama(
        str(path),
        n_ctx=512,
        n_batch=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


def _time_once(llm, tokens: list[int], n_tokens: int) -> tuple[float, float]:
    """Seconds to evaluate the prompt, then to decode ``n_tokens`` steps after it."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    prompt_done = time.perf_counter()
    _greedy_steps(llm, n_tokens)
    return prompt_done - start, time.perf_counter() - prompt_done


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
