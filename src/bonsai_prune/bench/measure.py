"""The measuring tools: a timer, a matmul peak, a process's peak memory, a child process
that measures alone, and ratios taken round by round with a spread that says when to
trust them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

MATMUL_SHAPE = (2048, 576, 1536)  # a token batch through one MLP projection of the default model


def matmul_gflops(dtype: torch.dtype, repeats: int = 10, trials: int = 5) -> float:
    """Peak GFLOP/s of a (2048x576)@(576x1536) matmul in ``dtype``: the best of ``trials``
    timings of ``repeats`` products (one timing read 109 GFLOP/s where another run read 128,
    and the model's own FLOP/s then came out above the "peak")."""
    m, k, n = MATMUL_SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * m * k * n * repeats / best / 1e9


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - began


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


MAX_RATIO_SPREAD = 0.25  # (max - min) / median of a ratio's rounds above this: not a result


def ratio_over_rounds(pruned: list[dict], dense: list[dict], key: str) -> dict:
    """``key``'s pruned/dense ratio in each round (both measured within it), summarised: the
    median, the range, and whether the range is narrow enough to quote (``trusted``)."""
    from statistics import median

    ratios = sorted(p[key] / d[key] for p, d in zip(pruned, dense, strict=True))
    middle = median(ratios)
    spread = (ratios[-1] - ratios[0]) / middle if middle else float("inf")
    return {
        "median": middle,
        "min": ratios[0],
        "max": ratios[-1],
        "rounds": len(ratios),
        "trusted": spread <= MAX_RATIO_SPREAD,
    }


def run_child(args: list[str]) -> dict:
    """Run ``python -m bonsai_prune.bench <args>`` and return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-m", "bonsai_prune.bench", *args], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed with code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])
