"""The grid's time left (study/estimate.py): each unfinished prune, recovery and evaluation at
the medians of the finished ones, and the kinds with no finished cell named, not guessed."""

from __future__ import annotations

import pytest

from bonsai_prune.study.estimate import time_left
from bonsai_prune.study.grid import CellRecord, parse_grid, recovered_key

GRID = {
    "out": "unused",
    "full_eval": True,
    "cells": [
        {"name": "b", "method": "bonsai", "sparsities": [0.2, 0.4], "recover": True},
        {"name": "w", "method": "wanda", "sparsities": [0.2, 0.4]},
    ],
}


def record(key, *, prune_s=None, eval_s=None, full_s=None, dense=False) -> CellRecord:
    """A cache entry: pruned in ``prune_s`` (None: not run), evaluated in ``eval_s``."""
    report = None if prune_s is None else {"complete": True, "wall_s": prune_s}
    summary = None if eval_s is None else {"wall_s": eval_s, "u_dagger": 20.0}
    full = None if full_s is None else {"wall_s": full_s}
    return CellRecord(key, dense, summary, report, None, None, full)


def records_for(grid, done: dict[str, dict]) -> dict[str, CellRecord]:
    keys = [grid.dense_key, *(c.key for c in grid.report_cells())]
    return {k: record(k, dense=k == grid.dense_key, **done.get(k, {})) for k in keys}


def test_unfinished_work_is_counted_at_the_medians_and_unknown_kinds_are_named():
    grid = parse_grid(GRID)
    bonsai_20, bonsai_40, wanda_20, wanda_40 = (c.key for c in grid.unique_cells())
    done = {
        grid.dense_key: {"eval_s": 100.0, "full_s": 400.0},
        bonsai_20: {"prune_s": 60.0, "eval_s": 100.0},  # 300 s per unit of sparsity
        recovered_key(grid, bonsai_20): {"prune_s": 500.0, "eval_s": 100.0},
    }
    left = time_left(grid, records_for(grid, done))
    # bonsai 40%: 0.4 x 300 + 100; its recovery 500 + 100; wanda's two prunes: no basis, their
    # evaluations 2 x 100; whole split: the best 20% model (bonsai's recovery) and 40%: 2 x 400
    assert left.seconds == pytest.approx(220 + 600 + 200 + 800)
    assert left.runs == 4 and left.no_basis == ("wanda",)
    assert left.text() == (
        "about 0.5 h left at the cache's medians (prunes by wanda not counted: none finished yet)"
    )


def test_a_finished_grid_has_nothing_left():
    grid = parse_grid({**GRID, "full_eval": False})
    done = {key: {"prune_s": 10.0, "eval_s": 100.0} for key in records_for(grid, {})}
    done[grid.dense_key] = {"eval_s": 100.0}
    left = time_left(grid, records_for(grid, done))
    assert (left.seconds, left.runs, left.no_basis) == (0.0, 0, ())
    assert left.text() == "nothing left to run"
