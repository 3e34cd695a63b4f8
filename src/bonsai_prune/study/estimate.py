"""How long a grid's unfinished work would take, at the medians of what its cache holds.

A study grid runs for days on a CPU, and its user (or the next session) plans around what is
left. The cells already run are the best clock there is: per kind of prune (the method and, for
a method that scores sub-models, its utility) the median seconds per unit of sparsity (an
iterative method's rounds grow with it), the median recovery and the median evaluation. A kind
with no finished cell yet (the first FinerCut) has no basis for its prune: it is named, not
guessed (its evaluations and recovery are counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from bonsai_prune.study.grid import (
    MAIN_GROUP,
    Cell,
    CellRecord,
    Grid,
    best_main_keys,
    recovered_key,
    scores_submodels,
)


@dataclass(frozen=True)
class TimeLeft:
    """What the unfinished prunes, recoveries and evaluations of a grid would take."""

    seconds: float  # the work that has a basis
    runs: int  # unfinished prunes and recoveries (each with its evaluation)
    no_basis: tuple[str, ...]  # kinds of prune with no finished cell: their prunes not counted

    def text(self) -> str:
        """``about 17.2 h at the cache's medians`` and what it leaves out, for one line."""
        if not self.runs and not self.no_basis:
            return "nothing left to run"
        text = f"about {self.seconds / 3600:.1f} h left at the cache's medians"
        if self.no_basis:
            text += f" (prunes by {', '.join(self.no_basis)} not counted: none finished yet)"
        return text


def _kind(cell: Cell) -> str:
    config = cell.prune_config
    if scores_submodels(config):
        return f"{config.method}+{config.utility.name}"
    return config.method


def time_left(grid: Grid, records: dict[str, CellRecord]) -> TimeLeft:
    """The time :func:`~bonsai_prune.study.runner.run_experiment` still needs for ``grid``,
    from ``records`` (key -> what the cache holds, every report cell's key and the dense one):
    each unfinished prune, recovery and evaluation at the median of the finished ones, and
    the whole-split evaluations still owed at the median whole-split time."""
    per_sparsity: dict[str, list[float]] = {}
    recoveries: list[float] = []
    evaluations: list[float] = []
    whole_split: list[float] = []
    cells = grid.unique_cells()
    for cell in cells:
        record = records[cell.key]
        if record.done and record.run_seconds:
            per_sparsity.setdefault(_kind(cell), []).append(
                record.run_seconds / cell.prune_config.sparsity
            )
        recovery = records.get(recovered_key(grid, cell.key)) if cell.recover else None
        if recovery is not None and recovery.done and recovery.run_seconds:
            recoveries.append(recovery.run_seconds)
    for record in records.values():
        if record.summary and record.summary.get("wall_s"):
            evaluations.append(record.summary["wall_s"])
        if record.full_summary and record.full_summary.get("wall_s"):
            whole_split.append(record.full_summary["wall_s"])
    evaluation = median(evaluations) if evaluations else 0.0
    seconds, runs, no_basis = 0.0, 0, []
    for cell in cells:
        record = records[cell.key]
        recovery = records.get(recovered_key(grid, cell.key)) if cell.recover else None
        todo = [not record.done, cell.recover and (recovery is None or not recovery.done)]
        if not any(todo):
            continue
        kind = _kind(cell)
        if todo[0]:
            if kind in per_sparsity:
                seconds += median(per_sparsity[kind]) * cell.prune_config.sparsity
            elif kind not in no_basis:
                no_basis.append(kind)
            seconds += evaluation
            runs += 1
        if todo[1]:
            seconds += (median(recoveries) if recoveries else 0.0) + evaluation
            runs += 1
    if grid.full_eval and whole_split:  # the dense model and the best one per main sparsity
        best = best_main_keys(grid, records)
        sparsities = {c.prune_config.sparsity for c in cells if c.group == MAIN_GROUP}
        owed = [s for s in sparsities if s not in best or not records[best[s]].full_summary]
        seconds += (len(owed) + (not records[grid.dense_key].full_summary)) * median(whole_split)
    return TimeLeft(seconds, runs, tuple(no_basis))
